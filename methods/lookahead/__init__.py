"""Lookahead decoding: a Jacobi window and an n-gram pool, verified in one pass per step."""

from methods.lookahead.decoder import LookaheadDecoder, LookaheadOptions, lookahead_visibility, upstream_visibility
from methods.registry import MethodSpec

SPEC = MethodSpec("lookahead", LookaheadDecoder, "lookahead decoding: Jacobi window + n-gram pool, one pass per step",
                  tune="methods.lookahead.tune:tune")

__all__ = ["LookaheadDecoder", "LookaheadOptions", "lookahead_visibility", "upstream_visibility", "SPEC"]
