"""Prompt-lookup decoding: draft the continuation of the latest n-gram's earlier occurrence.

A strong, training-free baseline on input-grounded tasks (summarisation, extraction,
editing), where the answer copies spans of the prompt. Drafts come from the prompt and
the text generated so far (largest n-gram first, earliest match), verified as a chain in
one target pass per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from methods.core.decoder import Decoder, Draft
from methods.core.engine import ForwardOutput
from methods.core.options import option
from methods.core.tree import chain_layout
from methods.core.verify import Acceptance
from methods.registry import MethodSpec


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


@dataclass(frozen=True)
class PldOptions:
    max_ngram: int = option(3, min=1, help="longest n-gram to look up")
    num_tokens: int = option(10, min=1, max=256, help="draft tokens taken after a match")


class PromptLookupDecoder(Decoder):
    """Prompt lookup: n-gram matches in the prompt and output as drafts, chain verification."""

    Options = PldOptions

    def step_capacity(self) -> int:
        return self.options.num_tokens + 1

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        self.history = list(prompt_ids)

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        self.history.append(root)
        drafts = lookup(self.history, self.options.max_ngram, min(self.options.num_tokens, room)) if room > 0 else []
        tokens = torch.cat([root_t, torch.tensor(drafts, dtype=torch.long, device=root_t.device)]) if drafts else root_t
        return Draft(tokens, chain_layout(len(drafts), self.engine))

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        self.history.extend(acc.tokens[:-1])  # the bonus token joins as the next root


SPEC = MethodSpec("pld", PromptLookupDecoder, "prompt-lookup decoding: n-gram matches in prompt and output as drafts")
