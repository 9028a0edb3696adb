"""SpS: a draft model on its own engine; token ids equal vanilla's and transformers' assisted generation."""

from __future__ import annotations

import pytest
import torch

from methods.core.decoder import GenConfig
from methods.core.engine import Engine
from methods.core.errors import UserError
from methods.sps import SpsDecoder
from methods.vanilla import VanillaDecoder
from tests.conftest import tiny_model


def _draft_folder(tmp_path, kind: str, seed: int = 1) -> str:
    draft = tiny_model(kind, seed=seed)
    draft.config.num_hidden_layers = 3
    folder = tmp_path / f"draft-{kind}"
    draft.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("gamma,adaptive", [(1, False), (4, False), (3, True)])
def test_sps_matches_vanilla_and_assisted_generate(tiny, gamma, adaptive, tmp_path):
    """The draft is the target with noise on its weights (tests/drafters.py): it agrees often and
    not always, so accepted and rejected drafts both occur; at least 30% of the steps must take
    several tokens."""
    from transformers import AutoModelForCausalLM

    from tests.drafters import assert_lossless, held_out_prompts, noisy_copy

    engine = Engine(tiny)
    folder = noisy_copy(tiny.config.model_type, 0.002, tmp_path / "draft")
    decoder = SpsDecoder(engine, draft=folder, gamma=gamma, adaptive=adaptive)
    prompts = held_out_prompts(3)
    gens = assert_lossless(decoder, VanillaDecoder(engine), prompts, 24, min_share=0.3)
    assert any(a < d + 1 for g in gens for a, d in zip(g.accepted[1:-1], g.draft_sizes[1:-1])), "no draft was ever rejected"
    assistant = AutoModelForCausalLM.from_pretrained(folder).eval()
    for prompt, got in zip(prompts, gens):
        ref = tiny.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            assistant_model=assistant, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                            pad_token_id=0)[0, len(prompt):].tolist()
        assert got.tokens == ref


def test_a_draft_that_is_the_target_accepts_everything(tmp_path):
    """Oracle: the target as its own draft; every step must accept all gamma drafts."""
    model = tiny_model("llama")
    folder = tmp_path / "self"
    model.save_pretrained(folder)
    engine = Engine(model)
    got = SpsDecoder(engine, draft=str(folder), gamma=3).generate([3, 4, 5], 21)
    assert got.accepted[1:-1] == [4] * (len(got.accepted) - 2)


def test_layers_only_draft_trains_loads_and_is_lossless(tmp_path, monkeypatch):
    from harness.train import toolkit
    from methods.core.training import TrainConfig
    from methods.sps import train as sps_train

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    engine = Engine(model)
    g = torch.Generator().manual_seed(0)
    data = [{"ids": torch.randint(0, 97, (24,), generator=g).tolist(), "prompt_len": 8} for _ in range(12)]
    cfg = TrainConfig(method="sps", out=str(tmp_path / "draft"), epochs=2, batch_sequences=4, checkpoint_every=5,
                      options={"layers": 1})
    meta = sps_train.train(cfg, model, None, data, "tiny-sps", toolkit("cpu"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "draft" / "draft_layers.safetensors"))
    assert all(k.startswith(("layers.0.", "norm.")) for k in saved) and meta["num_layers"] == 1
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    decoder = SpsDecoder(Engine(model), draft=str(tmp_path / "draft"), gamma=3)
    prompt = [7, 8, 9, 10]
    assert decoder.generate(prompt, 20).tokens == VanillaDecoder(engine).generate(prompt, 20).tokens
    sampled = decoder.generate(prompt, GenConfig(8, temperature=1.0, seed=0)).tokens
    assert len(sampled) == 8


def test_a_draft_with_another_vocabulary_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="must share the target's tokenizer"):
        SpsDecoder(Engine(tiny_model("llama")), draft=str(tmp_path / "other"))


def test_sampled_drafts_from_the_target_itself_are_always_accepted(tmp_path):
    """Drafts sampled from q = p pass min(1, p/q) = 1: every draft is accepted. Treated as point
    masses (accepted with p(x) alone) they would be rejected often: this fails if the loop
    stops handing SpS's q to the acceptance."""
    model = tiny_model("llama")
    engine = Engine(model)
    folder = tmp_path / "self-draft"
    model.save_pretrained(folder)
    decoder = SpsDecoder(engine, draft=str(folder), gamma=3)
    for seed in range(3):
        gen = decoder.generate([5, 9, 14, 3], GenConfig(25, temperature=1.0, seed=seed))
        drafted = [(a, d) for a, d in zip(gen.accepted[1:], gen.draft_sizes[1:]) if d > 0]
        assert drafted and all(a == d + 1 for a, d in drafted), gen.accepted
