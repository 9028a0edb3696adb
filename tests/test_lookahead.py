"""Lookahead decoding: mask structure and losslessness."""

from __future__ import annotations

import pytest
import torch

from methods.core.engine import Engine
from methods.lookahead import LookaheadDecoder, lookahead_visibility
from methods.vanilla import VanillaDecoder


def test_visibility_structure():
    vis, off = lookahead_visibility(window=3, levels=2, guesses=2, ngram=3)
    assert vis.shape == (1 + 6 + 4, 1 + 6 + 4)
    assert vis[:, 0].all()  # everything sees the root
    la = lambda l, c: 1 + l * 3 + c  # noqa: E731
    assert vis[la(1, 2), la(0, 0)] and vis[la(1, 2), la(0, 2)] and vis[la(1, 2), la(1, 2)]
    assert not vis[la(1, 2), la(1, 1)] and not vis[la(0, 1), la(0, 2)]
    assert off[la(1, 2)] == 1 + 2 + 1
    g0 = 7  # first guess chain: tokens 7, 8
    assert vis[g0 + 1, g0] and not vis[g0, g0 + 1] and not vis[g0 + 2, g0]
    assert off[g0].item() == 1 and off[g0 + 1].item() == 2


@pytest.mark.parametrize("window,ngram,guesses", [(3, 3, 2), (5, 4, 5), (2, 2, 0)])
def test_lookahead_is_lossless_on_tiny_models(tiny, window, ngram, guesses):
    engine = Engine(tiny)
    decoder = LookaheadDecoder(engine, window=window, ngram=ngram, guesses=guesses)
    vanilla = VanillaDecoder(engine)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 15, (20,), generator=g).tolist()
        ref = vanilla.generate(prompt, 30).tokens
        got = decoder.generate(prompt, 30)
        assert got.tokens == ref
        assert sum(got.accepted) == len(got.tokens)
