"""Prompt-lookup decoding: draft the continuation of the latest n-gram's earlier occurrence.

A strong, training-free baseline on input-grounded tasks (summarisation, extraction,
editing), where the answer copies spans of the prompt. Drafts come from the prompt and
the text generated so far (largest n-gram first, earliest match), verified as a chain in
one target pass per step.

How many of the match's tokens to verify depends on the hardware: a pass over 11 tokens
can cost about what one does (bf16 on a CPU with matrix units, a GPU) or several times as
much (float32 on a CPU). With ``policy=cost``
(the default) the decoder keeps, for each draft position k, how often its token was
accepted given that the ones before it were, and takes the length L <= ``num_tokens`` that
maximises (1 + expected accepted drafts) / t(L + 1), t being the measured verify-cost curve
(``methods.core.cost``), the same rule the trained methods' trees are picked by; where no
length beats a plain step (L = 0: one token for one pass) it takes plain steps, probing a
draft after 4, 8, ... 256 of them so the counts can recover. The counts start from an
optimistic prior, so a long draft is tried before it is given up, and carry across
prompts. ``policy=fixed`` always takes ``num_tokens``, as transformers' PLD does.

Under load a match is one sequence's: its draft widens the pass every sequence in the batch
waits on while only it gains, so there t is what that draft costs the batch per unit of the
sequence's own plain step (``methods.core.cost.slot_cost_curve``), and a draft must win back
the others' time as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from methods.core.decoder import Decoder, Draft
from methods.core.engine import ForwardOutput
from methods.core.fitting import PLAIN_RATE, Backoff
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


PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.8, 2.0  # optimistic, so long drafts are tried before they are given up


def best_length(accepted: Sequence[float], tried: Sequence[float], cost: Callable[[float], float],
                plain: float = PLAIN_RATE) -> int:
    """The draft length with the highest expected tokens per unit of verify cost, or 0 (a plain
    step) where none beats ``plain`` tokens per unit: a plain step's 1, or 0 for the best
    length whatever it earns (a probe)."""
    best, best_rate, reach, gain = 0, plain, 1.0, 1.0
    for k, (a, t) in enumerate(zip(accepted, tried), start=1):
        reach *= (a + PRIOR_WEIGHT * PRIOR_ACCEPTANCE) / (t + PRIOR_WEIGHT)  # P(tokens 1..k all accepted)
        gain += reach
        rate = gain / (cost(k + 1) / cost(1))
        if rate > best_rate:
            best, best_rate = k, rate
    return best


@dataclass(frozen=True)
class PldOptions:
    max_ngram: int = option(3, min=1, help="longest n-gram to look up")
    num_tokens: int = option(10, min=1, max=256, help="most draft tokens taken after a match")
    policy: str = option("cost", choices=("cost", "fixed"),
                         help="cost: draft length fitted online to acceptance and the measured verify cost; "
                              "fixed: always num_tokens")


class PromptLookupDecoder(Decoder):
    """Prompt lookup: n-gram matches in the prompt and output as drafts, chain verification."""

    Options = PldOptions

    def setup(self) -> None:
        n = self.options.num_tokens
        self.accepted, self.tried = [0.0] * n, [0.0] * n
        self.verify_cost: Callable[[float], float] | None = None
        self.backoff = Backoff()
        if self.options.policy == "cost":
            from methods.core.cost import slot_cost_curve
            from methods.core.files import cache_root

            self.verify_cost = slot_cost_curve(self.engine, self.model_name, cache_root())

    def draft_length(self) -> int:
        if self.verify_cost is None:
            return self.options.num_tokens
        length = best_length(self.accepted, self.tried, self.verify_cost)
        if self.backoff.plain(length > 0):
            return 0
        return length or best_length(self.accepted, self.tried, self.verify_cost, plain=0.0)

    def drafter(self) -> str:
        return "n-gram matches in the prompt and the output so far"

    def step_capacity(self) -> int:
        return self.options.num_tokens + 1

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        self.history = list(prompt_ids)

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        self.history.append(root)
        length = min(self.draft_length(), room)
        drafts = lookup(self.history, self.options.max_ngram, length) if length > 0 else []
        tokens = torch.cat([root_t, torch.tensor(drafts, dtype=torch.long, device=root_t.device)]) if drafts else root_t
        return Draft(tokens, chain_layout(len(drafts), self.engine))

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        self.history.extend(acc.tokens[:-1])  # the bonus token joins as the next root
        for k in range(min(draft.layout.draft_size, acc.accepted_drafts + 1)):  # up to the first rejection
            self.tried[k] += 1
            self.accepted[k] += k < acc.accepted_drafts


SPEC = MethodSpec("pld", PromptLookupDecoder, "prompt-lookup decoding: n-gram matches in prompt and output as drafts")
