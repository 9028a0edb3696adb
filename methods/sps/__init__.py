"""SpS: speculative decoding with a small draft model sharing the target's tokenizer."""

from methods.registry import MethodSpec
from methods.sps.decoder import SpsDecoder, SpsOptions, layers_only_draft

SPEC = MethodSpec(
    "sps", SpsDecoder, "speculative decoding with a small draft model (Leviathan et al.; Chen et al.)",
    needs="a draft model with the target's tokenizer (shipped for smollm2-135m: a distilled 2-layer draft)",
    train="methods.sps.train:train",
)

__all__ = ["SpsDecoder", "SpsOptions", "layers_only_draft", "SPEC"]
