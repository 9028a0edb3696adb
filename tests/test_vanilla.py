"""The vanilla decoder on the engine reproduces transformers' greedy ``generate`` token for token."""

from __future__ import annotations

import pytest
import torch

from methods.core.prompts import encode_conversation, stop_token_ids
from methods.core.engine import Engine
from methods.vanilla import VanillaDecoder
from tasks.builtin import _PROMPTS


def _generate_ref(model, prompt: list[int], n: int, eos=None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
        pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt):].tolist()


def test_vanilla_matches_generate_on_tiny_models(tiny):
    decoder = VanillaDecoder(Engine(tiny, capacity=8))
    for seed in range(3):
        prompt = torch.randint(0, 97, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        got = decoder.generate(prompt, 20)
        assert got.tokens == _generate_ref(tiny, prompt, 20)
        assert got.accepted == [1] * 20 and got.mean_accepted_length() == 1.0


def test_vanilla_stops_at_stop_token(tiny):
    decoder = VanillaDecoder(Engine(tiny))
    prompt = [1, 2, 3]
    free = decoder.generate(prompt, 10).tokens
    stop = free[3]
    got = decoder.generate(prompt, 10, stop=[stop])
    assert got.tokens == free[: free.index(stop) + 1]
    assert got.stopped_by == "eos"


@pytest.mark.slow
def test_vanilla_matches_generate_on_smollm2(smollm):
    model, tokenizer = smollm
    decoder = VanillaDecoder(Engine(model))
    stop = stop_token_ids(tokenizer, model)
    for _, text, _ in _PROMPTS:  # 12 prompts
        prompt = encode_conversation(tokenizer, [{"role": "user", "content": text}])
        got = decoder.generate(prompt, 24, stop=stop).tokens
        assert got == _generate_ref(model, prompt, 24, eos=stop), text[:40]
