"""Medusa-1: extra heads on the last hidden state draft a token tree; one target pass verifies it."""

from methods.medusa.decoder import MedusaDecoder, MedusaHeads, MedusaOptions, load_heads
from methods.registry import MethodSpec

SPEC = MethodSpec(
    "medusa", MedusaDecoder, "Medusa-1 heads on the last hidden state, tree verification",
    needs="trained heads (shipped for smollm2-135m)",
    train="methods.medusa.train:train",
)

__all__ = ["MedusaDecoder", "MedusaHeads", "MedusaOptions", "load_heads", "SPEC"]
