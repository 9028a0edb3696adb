"""Greedy autoregressive decoding: the baseline every speedup is measured against."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from methods.base import Decoder, Generation, register_method


@register_method("vanilla")
class VanillaDecoder(Decoder):
    """One target forward per token, on the same engine and cache as every other method."""

    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Collection[int] = ()
    ) -> Generation:
        engine = self.engine
        engine.reset(capacity=len(prompt_ids) + max_new_tokens + 1)
        stop = frozenset(stop)
        out = engine.forward(prompt_ids, logits_rows=slice(-1, None), commit=True)
        tokens: list[int] = []
        stopped_by = "length"
        while True:
            token = int(torch.argmax(out.logits[-1]))
            tokens.append(token)
            if token in stop:
                stopped_by = "eos"
                break
            if len(tokens) >= max_new_tokens:
                break
            out = engine.forward([token], commit=True)
        n = len(tokens)
        return Generation(tokens=tokens, accepted=[1] * n, draft_sizes=[0] * n, stopped_by=stopped_by)
