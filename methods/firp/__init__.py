"""FIRP (arXiv 2410.20488): pseudo hidden states of future tokens at an intermediate layer draft a tree
that rides along the verify pass."""

from methods.firp.decoder import FirpDecoder, FirpMaps, FirpOptions, build_plan, injections, load_firp
from methods.registry import MethodSpec

SPEC = MethodSpec(
    "firp", FirpDecoder, "FIRP pseudo hidden states at an intermediate layer; drafts ride along the verify pass",
    needs="trained maps (shipped for smollm2-135m)",
    train="methods.firp.train:train",
    analyze="methods.firp.analysis:analyze",
    report="methods.firp.report:section",
)

__all__ = ["FirpDecoder", "FirpMaps", "FirpOptions", "build_plan", "injections", "load_firp", "SPEC"]
