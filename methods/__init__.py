"""Decoding methods: one file per method, plus the shared engine, KV cache and tree code."""

from methods.base import Decoder, Generation, available_methods, get_method, register_method

__all__ = ["Decoder", "Generation", "available_methods", "get_method", "register_method"]
