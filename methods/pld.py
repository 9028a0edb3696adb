"""Prompt-lookup decoding: draft the continuation of the latest n-gram's earlier occurrence.

A strong, training-free baseline on input-grounded tasks (summarisation, extraction,
editing), where the answer copies spans of the prompt. Drafts come from the prompt and
the text generated so far (largest n-gram first, earliest match), verified as a chain in
one target pass per step, so the output is exactly greedy decoding's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from methods.base import Decoder, Generation, register_method, truncate_at_stop
from methods.chain import verify_chain
from methods.engine import Engine


def lookup(history: Sequence[int], max_ngram: int, num_tokens: int) -> list[int]:
    """The ``num_tokens`` that followed the earliest earlier occurrence of the longest trailing n-gram."""
    n_hist = len(history)
    for n in range(min(max_ngram, n_hist - 1), 0, -1):
        tail = list(history[-n:])
        first = tail[0]
        for start in range(0, n_hist - n):
            if history[start] == first and list(history[start:start + n]) == tail:
                follow = list(history[start + n:start + n + num_tokens])
                if follow:
                    return follow
    return []


@register_method("pld")
class PromptLookupDecoder(Decoder):
    """Prompt lookup: n-gram matches in the prompt and output as drafts, chain verification."""

    def __init__(self, engine: Engine, max_ngram: int | str = 3, num_tokens: int | str = 10, model_name: str = "",
                 **options: Any) -> None:
        self.max_ngram, self.num_tokens = int(max_ngram), int(num_tokens)
        super().__init__(engine, model_name=model_name, max_ngram=self.max_ngram, num_tokens=self.num_tokens,
                         **options)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Collection[int] = ()) -> Generation:
        engine = self.engine
        engine.reset(capacity=len(prompt_ids) + max_new_tokens + self.num_tokens + 1)
        stop = frozenset(stop)
        out = engine.forward(prompt_ids, logits_rows=slice(-1, None), commit=True)
        root = int(out.logits[-1].argmax())
        history = list(prompt_ids) + [root]
        gen = Generation(tokens=[root], accepted=[1], draft_sizes=[0], draft_times=[0.0], verify_times=[0.0])
        done = root in stop
        while not done and len(gen.tokens) < max_new_tokens:
            t0 = self._now()
            room = max_new_tokens - len(gen.tokens) - 1
            drafts = lookup(history, self.max_ngram, min(self.num_tokens, room)) if room > 0 else []
            t1 = self._now()
            new, _ = verify_chain(engine, root, drafts)
            t2 = self._now()
            new, done = truncate_at_stop(new, stop, max_new_tokens - len(gen.tokens))
            gen.add_step(new, len(drafts), t1 - t0, t2 - t1)
            history.extend(new)
            root = new[-1]
        gen.stopped_by = "eos" if done else "length"
        return gen
