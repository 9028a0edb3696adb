"""Prompt-lookup decoding: lookup rule, losslessness, and transformers' own PLD as oracle."""

from __future__ import annotations

import pytest
import torch

from methods.core.engine import Engine
from methods.pld import PromptLookupDecoder, best_length, lookup
from methods.vanilla import VanillaDecoder


def test_lookup_prefers_longest_ngram_and_earliest_match():
    hist = [1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(hist, 2, 2) == [9, 2]      # "2 3" first occurs at 1 -> followed by 9, 2
    assert lookup([4, 5, 6, 4], 3, 3) == [5, 6, 4]
    assert lookup([1, 2, 3], 3, 5) == []     # no earlier occurrence


@pytest.mark.parametrize("policy", ["fixed", "cost"])
def test_pld_is_lossless_on_tiny_model(tiny, policy, monkeypatch, tmp_path):
    """Prompts over a small alphabet give many n-gram matches: at least 5% of the steps must take
    several tokens."""
    from tests.drafters import assert_lossless, held_out_prompts

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path))
    engine = Engine(tiny)
    assert_lossless(PromptLookupDecoder(engine, policy=policy), VanillaDecoder(engine),
                    held_out_prompts(3, length=24, alphabet=20), 30, min_share=0.05)


def test_best_length_trades_expected_acceptance_against_measured_cost():
    flat, steep = (lambda n: 1.0), (lambda n: 1.0 + 0.25 * (n - 1))  # bf16-like, float32-like on this CPU
    unseen = [0.0] * 10
    assert best_length(unseen, unseen, flat) == 10  # free tokens: take them all
    assert best_length(unseen, unseen, steep) == 3  # the 0.8 prior: 0.8^4 no longer pays 0.25
    always = [100.0] * 10
    assert best_length(always, always, steep) == 10
    never = [0.0] * 10, [100.0] * 10
    assert best_length(*never, steep) == 0  # a plain step: no length pays for itself
    assert best_length(*never, steep, plain=0.0) == 1  # the best length all the same (a probe)
    assert best_length(*never, flat) > 0  # on a flat curve a draft costs nothing: always worth it
    # first token usually right, later ones rarely: one token
    assert best_length([90.0, 5.0] + [0.0] * 8, [100.0, 90.0] + [5.0] * 8, steep) == 1


def test_pld_cost_policy_learns_the_draft_length_from_acceptance(tiny, monkeypatch, tmp_path):
    """Under a float32-like cost, lookups that keep being rejected give way to plain steps (with
    a probe now and then) and ones that keep being accepted grow past the prior's pick (3) to
    num_tokens; on a flat cost curve even rejected lookups are taken whole. Lossless throughout."""
    import methods.pld as pld_module

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path))
    engine = Engine(tiny)
    prompt = torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = VanillaDecoder(engine).generate(prompt, 60).tokens
    flat, steep = (lambda n: 1.0), (lambda n: 1.0 + 0.25 * (n - 1))

    def run(cost, shift):  # lookups replaced by the true continuation, shifted by ``shift`` token ids
        monkeypatch.setattr(pld_module, "lookup", lambda h, n, k: [
            (t + shift) % 97 for t in ref[len(h) - len(prompt):len(h) - len(prompt) + k]])
        pld = PromptLookupDecoder(engine, num_tokens=6)
        pld.verify_cost = cost
        got = pld.generate(prompt, 60)
        assert got.tokens == ref
        return got.draft_sizes[1:-2], pld

    right, decoder = run(steep, 0)
    assert decoder.accepted[0] == decoder.tried[0] > 0 and right[0] == 3 and right == sorted(right) and right[-1] == 6, right
    wrong, decoder = run(steep, 1)
    assert decoder.accepted[0] == 0 and wrong[0] == 3 and wrong.count(0) > 2 * len(wrong) // 3, wrong
    assert set(wrong[-10:]) <= {0, 1} and any(wrong[wrong.index(0):]), wrong  # probes draft the best length
    free, _ = run(flat, 1)
    assert free[:20] == [6] * 20, free


@pytest.mark.slow
def test_pld_matches_transformers_prompt_lookup(smollm):
    from methods.core.prompts import encode_conversation, stop_token_ids

    model, tok = smollm
    decoder = PromptLookupDecoder(Engine(model), policy="fixed")  # transformers' rule
    stop = stop_token_ids(tok, model)
    text = ("Summarize in one sentence: The council voted to close the old library on Main Street and move "
            "its books to the community centre, because the library building needed repairs.")
    prompt = encode_conversation(tok, [{"role": "user", "content": text}])
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=10, eos_token_id=stop)
    got = decoder.generate(prompt, 40, stop)
    assert got.tokens == ref[0, len(prompt):].tolist()
    assert got.mean_accepted_length() > 1.0  # the summary copies spans of the prompt
