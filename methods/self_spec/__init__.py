"""Self-speculative decoding (Draft & Verify): the model with skipped sublayers drafts, the full model verifies."""

from methods.registry import MethodSpec
from methods.self_spec.decoder import SelfSpecOptions, SelfSpeculativeDecoder, load_skip_set

SPEC = MethodSpec(
    "self_spec", SelfSpeculativeDecoder,
    "Draft & Verify: the model with skipped sublayers drafts, adaptive draft exit",
    needs="a skip set (shipped for smollm2-135m, or `harness tune self_spec`)",
    tune="methods.self_spec.tune:tune",
)

__all__ = ["SelfSpecOptions", "SelfSpeculativeDecoder", "load_skip_set", "SPEC"]
