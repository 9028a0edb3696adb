"""First divergence from vanilla and its verdict against a float32 reference: a planted bug must be
judged real, a planted tie numerics."""

from __future__ import annotations

import copy

import torch

from harness.divergence import find_divergences, float32_copy
from methods.core.engine import Engine
from methods.core.prompts import encode_conversation
from methods.vanilla import VanillaDecoder
from tasks.base import Example
from tests.conftest import tiny_model


class ToyTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 97 for c in text]}


EXAMPLE = Example("e1", "chat", ("hi",), task="t")
TOK = ToyTokenizer()
PROMPT = encode_conversation(TOK, [{"role": "user", "content": "hi"}])


def rec(method, tokens):
    return {"task": "t", "example_id": "e1", "method": method, "turns": [{"tokens": tokens, "text": "x"}]}


def last_logits(engine, ids):
    engine.reset()
    return engine.forward(ids, logits_rows=slice(-1, None)).logits[-1].float()


class SwapOneToken(VanillaDecoder):
    """A planted bug: vanilla, except that the token at ``at`` is replaced by the model's least likely one."""

    at = 3

    def generate(self, prompt_ids, config, stop=()):
        out = super().generate(prompt_ids, config, stop)
        logits = last_logits(self.engine, list(prompt_ids) + out.tokens[:self.at])
        out.tokens[self.at] = int(torch.argmin(logits))
        return out


def bf16(model):
    return copy.deepcopy(model).to(torch.bfloat16)


def test_float32_run_divergence_position_and_gap():
    engine = Engine(tiny_model("llama"))
    van = VanillaDecoder(engine).generate(PROMPT, 10).tokens
    runner_up = int(torch.topk(last_logits(engine, PROMPT + van[:3]), 2).indices[1])
    other = van[:3] + [runner_up] + van[4:]
    called = []
    found = find_divergences([rec("vanilla", van), rec("m", other), rec("same", van)], [EXAMPLE], engine, TOK,
                             reference=lambda: called.append(1))
    assert len(found) == 1 and found[0]["method"] == "m" and found[0]["position"] == 3
    assert found[0]["chosen_gap"] > 1e-3 and found[0]["verdict"] == "real"
    assert called == []  # a float32 run needs no float32 copy


def test_planted_bug_is_judged_real_against_float32():
    model = tiny_model("llama")
    engine = Engine(bf16(model))
    van = VanillaDecoder(engine).generate(PROMPT, 10).tokens
    bug = SwapOneToken(engine).generate(PROMPT, 10).tokens
    assert bug != van
    loads = []

    def reference():
        loads.append(1)
        return float32_copy(engine)

    found = find_divergences([rec("vanilla", van), rec("bug", bug), rec("bug2", bug)], [EXAMPLE], engine, TOK,
                             reference=reference)
    assert [d["verdict"] for d in found] == ["real", "real"] and found[0]["position"] == SwapOneToken.at
    assert abs(found[0]["reference_gap"]) > found[0]["tolerance"] == 2 * found[0]["error"] > 0
    assert loads == [1]  # the float32 copy is made once per run, however many divergences


def test_planted_tie_is_judged_numerics():
    """Two tokens with identical output rows tie exactly in float32: whichever a method picks is numerics."""
    model = tiny_model("llama")
    van = VanillaDecoder(Engine(model)).generate(PROMPT, 10).tokens
    a = van[3]
    b = next(t for t in range(97) if t not in van)
    with torch.no_grad():
        model.lm_head.weight[b] = model.lm_head.weight[a]
    engine = Engine(bf16(model))
    van = VanillaDecoder(engine).generate(PROMPT, 10).tokens
    pos = next(i for i, t in enumerate(van) if t in (a, b))
    twin = b if van[pos] == a else a
    tied = van[:pos] + [twin] + van[pos + 1:]
    found = find_divergences([rec("vanilla", van), rec("tie", tied)], [EXAMPLE], engine, TOK)
    assert len(found) == 1 and found[0]["position"] == pos
    assert found[0]["verdict"] == "numerics" and abs(found[0]["reference_gap"]) <= found[0]["error"]
    # the same swap at a position without a tie is real: the verdict depends on the logits, not the position
    untied = van[:pos - 1] + [twin] + van[pos:] if pos > 0 and van[pos - 1] not in (a, b) else None
    if untied is not None:
        assert find_divergences([rec("vanilla", van), rec("x", untied)], [EXAMPLE], engine, TOK)[0]["verdict"] == "real"


def test_prefix_outputs_are_length_only():
    engine = Engine(bf16(tiny_model("llama")))
    van = VanillaDecoder(engine).generate(PROMPT, 10).tokens
    found = find_divergences([rec("vanilla", van), rec("short", van[:5])], [EXAMPLE], engine, TOK,
                             reference=lambda: (_ for _ in ()).throw(AssertionError("no reference needed")))
    assert found[0]["verdict"] == "length"


def test_load_records_pair_with_vanilla_at_the_same_level():
    """Under load, vanilla's tokens may differ between levels (a batched product rounds otherwise):
    a method's record is judged against vanilla's at its own level, and its entry names the level."""
    from types import SimpleNamespace

    def at(method, tokens, level):
        return {**rec(method, tokens), "concurrency": level}

    records = [at("vanilla", [1, 2, 3, 4], 1), at("vanilla", [1, 2, 3], 2),
               at("m", [1, 2, 3, 4], 1), at("m", [1, 2, 3], 2), at("n", [1, 2, 3, 4], 2)]
    engine = SimpleNamespace(dtype=torch.float32)  # prefix-only divergences: no logits are recomputed
    found = find_divergences(records, [EXAMPLE], engine, TOK)
    assert [(d["method"], d["concurrency"], d["verdict"]) for d in found] == [("n", 2, "length")]
