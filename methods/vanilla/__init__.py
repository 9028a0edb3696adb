"""Autoregressive decoding, one target forward per token: the baseline every speedup is measured against.

It is the shared decode loop with a draft of just the root, on the same engine and cache
as every other method.
"""

from methods.core.decoder import Decoder
from methods.registry import MethodSpec


class VanillaDecoder(Decoder):
    """One target forward per token, on the same engine and cache as every other method."""


SPEC = MethodSpec("vanilla", VanillaDecoder, "autoregressive decoding on the shared engine (the baseline)")
