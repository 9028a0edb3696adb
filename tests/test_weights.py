"""One weights locator for every trained method: the pre-load check and setup ask it the same question."""

from __future__ import annotations

import pytest
import torch

from methods.core.errors import UserError
from methods.core.options import parse_options
from methods.registry import get_spec

TRAINED = {"medusa": "heads", "firp": "weights", "eagle": "head", "sps": "draft", "self_spec": "skip"}


@pytest.mark.parametrize("method", sorted(TRAINED))
def test_a_missing_weight_names_the_option_and_the_command(method, tmp_path):
    decoder = get_spec(method).decoder
    locator = decoder.weights
    assert locator is not None and locator.option == TRAINED[method]
    options = parse_options(decoder.Options, {}, where=method)
    with pytest.raises(UserError) as err:
        decoder.check_ready("no-such-model", options)
    message = str(err.value)
    assert f"--method-option {method}.{TRAINED[method]}=" in message and "--model no-such-model" in message
    assert "\n" not in message
    # the shipped entry for the default model is found, and the option overrides it
    shipped = locator.shipped("smollm2-135m")
    assert shipped is not None and locator.locate("smollm2-135m", options) == shipped
    given = parse_options(decoder.Options, {TRAINED[method]: str(shipped)}, where=method)
    decoder.check_ready("no-such-model", given)
    assert locator.locate("no-such-model", given) == str(shipped)


def test_setup_uses_the_same_locator(monkeypatch):
    """Breaking the locator breaks setup too: there is no second lookup to fall back on."""
    from methods.core.engine import Engine
    from methods.medusa import MedusaDecoder
    from tests.conftest import tiny_model

    monkeypatch.setattr(type(MedusaDecoder.weights), "shipped", lambda self, model: None)
    with pytest.raises(UserError, match="medusa.heads=DIR"):
        MedusaDecoder(Engine(tiny_model("llama")), model_name="smollm2-135m")


def test_draft_parameters_are_counted_from_the_files_without_loading(tmp_path):
    """``harness list``, the manifest and the report give each drafter's size from its files'
    headers; the count equals the loaded module's. A trainer's folder (the weights beside its
    resumable checkpoint) counts the weights alone."""
    from methods.core.weights import weights_size
    from methods.medusa.decoder import MedusaDecoder, load_heads

    path = MedusaDecoder.weights.shipped("smollm2-135m")
    size = weights_size(path)
    heads, _ = load_heads(path, 576, 49152)
    assert size["parameters"] == sum(p.numel() for p in heads.parameters()) > 0
    assert size["bytes"] == (path / "heads.safetensors").stat().st_size
    options = parse_options(MedusaDecoder.Options, {}, where="medusa")
    assert MedusaDecoder.weights.size("smollm2-135m", options) == size
    assert get_spec("pld").decoder.weights is None  # training-free: the base reports 0
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "heads.safetensors").write_bytes((path / "heads.safetensors").read_bytes())
    torch.save({"step": 950, "model": heads.state_dict()}, trained / "checkpoint.pt")
    assert weights_size(trained) == size
