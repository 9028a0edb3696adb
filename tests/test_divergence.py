"""First divergence from vanilla and its logit gap: separates near-ties from real bugs."""

from __future__ import annotations

import torch

from harness.divergence import find_divergences
from methods.core.engine import Engine
from methods.vanilla import VanillaDecoder
from tasks.base import Example
from tests.conftest import tiny_model


class ToyTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_divergence_position_and_gap():
    model = tiny_model("llama")
    engine = Engine(model)
    tok = ToyTokenizer()
    ex = Example("e1", "chat", ("hi",), task="t")
    from methods.core.prompts import encode_conversation

    prompt = encode_conversation(tok, [{"role": "user", "content": "hi"}])
    van = VanillaDecoder(engine).generate(prompt, 10).tokens
    logits = engine.forward(prompt + van[:3], logits_rows=slice(-1, None)).logits[-1] if engine.reset() is None else None
    runner_up = int(torch.topk(logits, 2).indices[1])
    other = van[:3] + [runner_up] + van[4:]

    def rec(method, tokens):
        return {"task": "t", "example_id": "e1", "method": method, "turns": [{"tokens": tokens, "text": "x"}]}

    found = find_divergences([rec("vanilla", van), rec("m", other), rec("same", van)], [ex], engine, tok)
    assert len(found) == 1 and found[0]["method"] == "m" and found[0]["position"] == 3
    assert found[0]["chosen_gap"] > 0 and found[0]["near_tie"] is False
    assert find_divergences([rec("vanilla", van), rec("m", other)], [ex], engine, tok, tolerance=1e9)[0]["near_tie"]
