"""Prompt-lookup decoding: lookup rule, losslessness, and transformers' own PLD as oracle."""

from __future__ import annotations

import pytest
import torch

from methods.core.engine import Engine
from methods.pld import PromptLookupDecoder, lookup
from methods.vanilla import VanillaDecoder


def test_lookup_prefers_longest_ngram_and_earliest_match():
    hist = [1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(hist, 2, 2) == [9, 2]      # "2 3" first occurs at 1 -> followed by 9, 2
    assert lookup([4, 5, 6, 4], 3, 3) == [5, 6, 4]
    assert lookup([1, 2, 3], 3, 5) == []     # no earlier occurrence


def test_pld_is_lossless_on_tiny_model(tiny):
    engine = Engine(tiny)
    pld, vanilla = PromptLookupDecoder(engine), VanillaDecoder(engine)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 20, (24,), generator=g).tolist()  # small alphabet: many n-gram matches
        ref = vanilla.generate(prompt, 30).tokens
        got = pld.generate(prompt, 30)
        assert got.tokens == ref
        assert sum(got.accepted) == len(got.tokens)


@pytest.mark.slow
def test_pld_matches_transformers_prompt_lookup(smollm):
    from methods.core.prompts import encode_conversation, stop_token_ids

    model, tok = smollm
    decoder = PromptLookupDecoder(Engine(model))
    stop = stop_token_ids(tok, model)
    text = ("Summarize in one sentence: The council voted to close the old library on Main Street and move "
            "its books to the community centre, because the library building needed repairs.")
    prompt = encode_conversation(tok, [{"role": "user", "content": text}])
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=10, eos_token_id=stop)
    got = decoder.generate(prompt, 40, stop)
    assert got.tokens == ref[0, len(prompt):].tolist()
    assert got.mean_accepted_length() > 1.0  # the summary copies spans of the prompt
