"""Draft sizes fitted to the machine, and plain steps where no draft can pay.

Every fitted choice in this project is the same trade: a step that verifies a draft is worth
its expected tokens over its cost, both counted in one-token target passes on this machine
(``methods.core.cost`` measures the pass curve t(n)/t(1) and a method's drafting work). A
plain step, a draft of just the root as vanilla takes, gets one token for one unit. A
draft predicted to deliver fewer tokens per unit than that costs more than it saves, so a
method then takes plain steps and says so in ``describe()`` (the manifest and the report),
with the reason; its always-drafting configuration stays an option, for comparison.

Methods whose estimates come from the decoding itself (PLD's acceptance counts, SpS's
acceptance rate, EAGLE's running efficiency) would stop learning once they stop drafting,
so ``Backoff`` lets them probe a draft now and then while their estimate says no.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

PLAIN_RATE = 1.0
"""Tokens per unit of cost of a plain step: one token for one one-token pass."""

Choice = TypeVar("Choice")


def best_option(options: Iterable[tuple[Choice, float, float]]) -> tuple[Choice, float]:
    """The ``(choice, expected tokens, cost)`` with the most tokens per unit of cost, and that rate.

    Ties go to the earlier option: list the cheaper ones first (a plain step, γ = 0, first)."""
    best: tuple[Any, float] | None = None
    for choice, tokens, cost in options:
        rate = tokens / cost
        if best is None or rate > best[1]:
            best = (choice, rate)
    if best is None:
        raise ValueError("no options to choose from")
    return best


def chain_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens of a step verifying a chain of ``gamma`` drafts, each accepted with
    probability ``alpha`` once the ones before it were (the bonus token included):
    (1 - α^(γ+1)) / (1 - α), Leviathan et al.'s expected length."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def alpha_from_chain(accepted_length: float, gamma: int) -> float:
    """The per-token acceptance α at which a ``gamma``-chain accepts ``accepted_length`` tokens a
    step (the inverse of ``chain_tokens``, by bisection): what a trainer's validated chain
    length says about each token."""
    target = min(max(accepted_length, 1.0), gamma + 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chain_tokens(mid, gamma) < target else (lo, mid)
    return (lo + hi) / 2


def best_prefix(values: Sequence[float], spent: float, curve: Callable[[float], float],
                scale: float = 1.0, most: int | None = None) -> tuple[int, float]:
    """How many draft nodes to verify, and the step's predicted tokens per unit of cost.

    ``values`` estimate each node's acceptance probability (EAGLE-2's product of draft
    probabilities along its path), sorted from high to low; a tree of the best k nodes then
    accepts about 1 + ``scale`` x their sum. ``spent`` is the drafting work already done this
    step. k = 0, verifying the root alone, is a candidate: it is what a step whose drafts
    are all too unlikely should take."""
    most = len(values) if most is None else min(most, len(values))
    best_k, best_rate, gain = 0, 1.0 / (spent + curve(1)), 1.0
    for k in range(1, most + 1):
        gain += scale * values[k - 1]
        rate = gain / (spent + curve(k + 1))
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k, best_rate


def fitted(best_predicted_speedup: float, best: str, *, basis: str = "this machine's measured costs",
           **extra: Any) -> dict[str, Any]:
    """The record a fitted method puts in ``describe()``: whether it drafts, the best
    predicted speedup over vanilla and why, for the manifest and the report.

    A draft must be predicted ``TIE_TOLERANCE`` above a plain step: a prediction that close is
    a tie (``methods.core.cost.TIE_TOLERANCE``: curves measured minutes apart differ by that
    much), and a tie goes to the shallowest choice, which is the plain step. A trainer's
    accepted length comes from its own held-out split and overstates other tasks, so a draft
    predicted at 1.01x loses more often than it wins, and under load it slows every sequence
    in the batch."""
    from methods.core.cost import TIE_TOLERANCE

    drafting = best_predicted_speedup >= PLAIN_RATE + TIE_TOLERANCE
    if drafting:
        reason = f"{best} is predicted at {best_predicted_speedup:.2f}x vanilla from {basis}"
    elif best_predicted_speedup >= PLAIN_RATE:
        reason = (f"no draft is predicted {TIE_TOLERANCE:.0%} above a plain step from {basis} (best: "
                  f"{best}, {best_predicted_speedup:.2f}x vanilla, a tie), so it takes plain steps as vanilla does")
    else:
        reason = (f"no draft is predicted to beat a plain step from {basis} (best: {best}, "
                  f"{best_predicted_speedup:.2f}x vanilla), so it takes plain steps as vanilla does")
    return {"drafting": drafting, "best_predicted_speedup": round(best_predicted_speedup, 4), "reason": reason,
            **extra}


class RateGuard:
    """Plain steps, with ``Backoff``'s probes, while a fitted draft's realized rate is under a plain step's.

    A fit predicts its rate (tokens per unit of step cost) from an accepted length measured on
    its trainer's held-out split, which overstates other tasks: the shipped Medusa heads' 3-node
    tree, predicted at 1.05x vanilla at batch 2, accepted 1.28 tokens a step on MT-bench
    against the trainer's 1.56 and ran at 0.83x. The guard keeps the fit's step cost (the
    predicted accepted length over the predicted rate: the pass and the drafting, both
    measured) and replaces the accepted length by what verification accepts, the mean of the last
    ``WINDOW`` drafted steps, with the prediction weighing in until the window fills, and backs off
    only when that mean is two standard errors under a plain step's rate. Only drafted
    steps update it; probes let a task that starts to accept more (a summary copying its
    source) draft again. A slot's decoder shares its guard with the other slots of the batch
    (``Decoder.fork`` copies the reference), so the estimate pools all their steps."""

    WINDOW = 64  # drafted steps the realized accepted length is averaged over
    PRIOR = 8    # pseudo-steps at the predicted accepted length, fading as the window fills

    def __init__(self, expected_accepted: float, predicted_rate: float) -> None:
        self.expected = expected_accepted
        self.step_cost = expected_accepted / predicted_rate
        self.window: deque[int] = deque(maxlen=self.WINDOW)
        self.total = self.squares = 0  # the window's sum and sum of squares: O(1) a step
        self.backoff = Backoff()
        self.drafted = 0

    def _weight(self) -> float:
        return len(self.window) + self.PRIOR * (1 - len(self.window) / self.WINDOW)

    @property
    def rate(self) -> float:
        """Tokens a drafted step advances, per unit of its cost: recent steps, and the prediction
        until there are enough of them."""
        prior = self._weight() - len(self.window)
        return (self.total + prior * self.expected) / self._weight() / self.step_cost

    def pays(self) -> bool:
        """Whether drafting may still pay: the rate two standard errors up reaches a plain step's.
        A mean near 1 wanders under it by chance; backing off on that would take plain steps
        from a draft that pays, and the few probes that follow recover slowly."""
        n = len(self.window)
        spread = math.sqrt(max(0.0, self.squares / n - (self.total / n) ** 2)) / self.step_cost if n > 1 else 0.0
        return self.rate + 2 * spread / math.sqrt(self._weight()) >= PLAIN_RATE

    def plain(self) -> bool:
        """Whether this step is a plain one (asked once a step)."""
        return self.backoff.plain(self.pays())

    def observe(self, tokens: int) -> None:
        """A drafted step's outcome: the tokens it advanced (accepted drafts and the bonus)."""
        self.drafted += 1
        if len(self.window) == self.WINDOW:
            self.total -= self.window[0]
            self.squares -= self.window[0] ** 2
        self.window.append(tokens)
        self.total += tokens
        self.squares += tokens * tokens

    def counts(self) -> dict[str, int]:
        """What the guard decided so far: drafted steps (probes among them) and plain steps. A
        generation's share is the difference of two readings (``guard_delta``)."""
        return {"drafted_steps": self.drafted, "plain_steps": self.backoff.plain_steps, "probes": self.backoff.probes}

    def record(self) -> dict[str, Any]:
        return {"step_cost": round(self.step_cost, 4), "window": self.WINDOW, "realized_rate": round(self.rate, 4),
                **self.counts()}


def guard_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    """The guard's decisions between two ``RateGuard.counts`` readings (None without a guard)."""
    if before is None or after is None:
        return after
    return {k: after[k] - before.get(k, 0) for k in after}


def guard_totals(parts: Iterable[dict[str, int] | None]) -> dict[str, int] | None:
    """The sum of several generations' guard decisions (None when none had a guard)."""
    total: dict[str, int] | None = None
    for part in parts:
        if part:
            total = {k: (total or {}).get(k, 0) + v for k, v in part.items()}
    return total


class Backoff:
    """Plain steps while an online estimate says drafting does not pay, with a probe now and then.

    ``plain(pays)`` is asked once a step. While ``pays`` holds it answers False (draft). While
    it does not, it answers True (a plain step) except after ``first``, then twice as many,
    up to ``most``, plain steps in a row, when it answers False once: that probe's outcome
    updates the estimate, which a method that never drafted again could never revise. A
    step that pays resets the wait. Probes then cost little (one step in 4, 8, ... 256 at a
    rate somewhat under a plain step's) and a run whose drafts start to be accepted (a
    summary that copies its source) is drafting again within a few probes."""

    def __init__(self, first: int = 4, most: int = 256) -> None:
        self.first, self.most = first, most
        self.wait, self.left = first, first
        self.plain_steps = self.probes = 0

    def plain(self, pays: bool) -> bool:
        if pays:
            self.wait = self.left = self.first
            return False
        if self.left > 0:
            self.left -= 1
            self.plain_steps += 1
            return True
        self.probes += 1
        self.wait = min(2 * self.wait, self.most)
        self.left = self.wait
        return False
