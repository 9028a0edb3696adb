"""EAGLE-2: a one-layer draft head on the target's features drafts a dynamic tree; one target pass verifies it."""

from methods.eagle.decoder import EagleDecoder, EagleHead, EagleOptions, load_head
from methods.registry import MethodSpec

SPEC = MethodSpec(
    "eagle", EagleDecoder, "EAGLE-2: feature-level draft head with its own KV cache, dynamic draft tree",
    needs="a trained head (shipped for smollm2-135m; upstream EAGLE checkpoints load too)",
    train="methods.eagle.train:train",
)

__all__ = ["EagleDecoder", "EagleHead", "EagleOptions", "load_head", "SPEC"]
