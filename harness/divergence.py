"""Where a method's tokens first differ from vanilla's, and whether rounding can explain it.

Run after all timed decoding (it costs untimed forwards per mismatch). Greedy speculative
decoding should reproduce vanilla token for token; in low precision it may not, because a
tree verification pass rounds differently from vanilla's one-token passes, and two nearly
tied tokens can swap. To tell that apart from a bug, a fixed rule of thumb (so many ulps)
is not enough: the rounding error of a low-precision pass grows with the logits and the
pass's shape. So the verdict is measured, per divergence, against a float32 reference on
the same weights:

* recompute the logits at the divergence prefix in the run's precision and in float32
  (a float32 copy of the model, made once per run and only when a low-precision run has a
  divergence to judge);
* the *low-precision error* at that position is the largest |low-precision logit -
  float32 logit| over the vocabulary;
* the divergence is ``numerics`` when the two tokens' float32 gap is within twice that
  error, else ``real``: a discrepancy that rounding does not explain, reported loudly. Twice,
  because the verdict is about a *difference* of two logits, each off by up to the error, in
  a pass of another shape (a tree pass) than the one measured.

A float32 run has no higher-precision reference here; its divergences count as numerics
when the gap is under ``FLOAT32_TIE`` (kernel-order differences), else real.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from harness.metrics import BASELINE, first_divergence
from methods.core.prompts import encode_conversation
from tasks.base import Example

FLOAT32_TIE = 1e-3


def float32_copy(engine: Any) -> Any:
    """An engine over a float32 copy of ``engine``'s model: the same weights, upcast exactly."""
    from methods.core.engine import Engine

    return Engine(copy.deepcopy(engine.model).to(torch.float32))


def _last_logits(engine: Any, ids: Sequence[int]) -> torch.Tensor:
    engine.reset(capacity=len(ids) + 1)
    return engine.forward(list(ids), logits_rows=slice(-1, None)).logits[-1].float()


def judge(low: torch.Tensor, reference: torch.Tensor | None, v_tok: int, m_tok: int) -> dict[str, Any]:
    """The verdict at one position from the run-precision logits and (low-precision runs) float32 ones."""
    top2 = torch.topk(low, 2).values
    out: dict[str, Any] = {"vanilla_token": v_tok, "method_token": m_tok,
                           "chosen_gap": float(low[v_tok] - low[m_tok]), "top2_gap": float(top2[0] - top2[1])}
    if reference is None:  # a float32 run
        numerics = abs(out["chosen_gap"]) < FLOAT32_TIE
        out.update(reference_gap=out["chosen_gap"], error=None, tolerance=FLOAT32_TIE)
    else:
        error = float((low - reference).abs().max())
        ref_gap = float(reference[v_tok] - reference[m_tok])
        tolerance = 2 * error  # a gap between two logits, each within ``error`` of float32
        numerics = abs(ref_gap) <= tolerance
        out.update(reference_gap=ref_gap, error=error, tolerance=tolerance)
    out.update(verdict="numerics" if numerics else "real", near_tie=numerics)
    return out


def find_divergences(records: Sequence[dict[str, Any]], examples: Sequence[Example], engine: Any, tokenizer: Any,
                     reference: Callable[[], Any] | None = None,
                     on_progress: Callable[[], Any] | None = None) -> list[dict[str, Any]]:
    """First divergence of every method record from vanilla's, with its verdict.

    A record made under load is paired with vanilla's record of the same example at the same
    concurrency level (the batch a token was computed in is part of its numerics), and its
    entry carries that level.

    ``reference`` builds the float32 engine (default: ``float32_copy(engine)``); it is called at
    most once, and only when ``engine`` is in low precision and a divergence needs judging.
    ``on_progress`` is called once per record judged or passed over (a low-precision run's
    verdicts can take minutes on a CPU).
    """
    by_key = {(e.task, e.id): e for e in examples}
    vanilla = {(r["task"], r["example_id"], r.get("concurrency")): r for r in records
               if r["method"] == BASELINE and not r.get("skipped")}
    low_precision = engine.dtype != torch.float32
    ref_engine: list[Any] = []

    def reference_logits(ids: list[int]) -> torch.Tensor | None:
        if not low_precision:
            return None
        if not ref_engine:
            ref_engine.append((reference or (lambda: float32_copy(engine)))())
        return _last_logits(ref_engine[0], ids)

    found = []
    for rec in records:
        if on_progress is not None:
            on_progress()
        base = vanilla.get((rec["task"], rec["example_id"], rec.get("concurrency")))
        if rec["method"] == BASELINE or base is None or rec.get("skipped"):
            continue
        example = by_key.get((rec["task"], rec["example_id"]))
        if example is None:
            continue
        messages: list[dict[str, str]] = []
        for turn_no, (ours, theirs) in enumerate(zip(rec["turns"], base["turns"])):
            messages.append({"role": "user", "content": example.turns[turn_no]})
            pos = first_divergence(ours["tokens"], theirs["tokens"])
            if pos is None:
                messages.append({"role": "assistant", "content": theirs["text"]})
                continue
            entry: dict[str, Any] = {"task": rec["task"], "example_id": rec["example_id"], "method": rec["method"],
                                     "turn": turn_no, "position": pos}
            if rec.get("concurrency") is not None:
                entry["concurrency"] = rec["concurrency"]
            if pos < len(ours["tokens"]) and pos < len(theirs["tokens"]):
                ids = encode_conversation(tokenizer, messages) + theirs["tokens"][:pos]
                low = _last_logits(engine, ids)
                entry.update(judge(low, reference_logits(ids), theirs["tokens"][pos], ours["tokens"][pos]))
            else:  # one output is a prefix of the other (e.g. a stop token accepted in a block)
                entry.update(verdict="length", near_tie=False, note="length differs")
            found.append(entry)
            break
    return found


def real_divergences(divergences: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in divergences if d.get("verdict", "numerics" if d.get("near_tie") else "real") == "real"
            and d.get("note") != "length differs"]
