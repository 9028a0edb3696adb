"""Where a method's tokens first differ from vanilla's, and whether that was a numerical near-tie.

Run after all timed decoding (it costs one untimed forward per mismatch). At the first
divergent position, vanilla's own logits are recomputed and the gap between the token
vanilla chose and the token the method chose is recorded: a gap below the tolerance
means both were (numerically) equally good — bf16 rounding, not a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import math

import torch

from harness.metrics import BASELINE, first_divergence
from methods.core.prompts import encode_conversation
from tasks.base import Example

TIE_FLOOR = {torch.float32: 1e-3, torch.bfloat16: 0.0, torch.float16: 0.0}
ULPS = 4  # a gap of a few units in the last place of the logit is rounding, not a decision


def tie_tolerance(dtype: torch.dtype, magnitude: float) -> float:
    """Gaps up to ``ULPS`` ulps of ``dtype`` at the logits' magnitude (or a floor) count as ties."""
    bits = {torch.bfloat16: 7, torch.float16: 10}.get(dtype, 23)
    ulp = 2.0 ** (math.floor(math.log2(max(abs(magnitude), 1e-30))) - bits)
    return max(TIE_FLOOR.get(dtype, 1e-3), ULPS * ulp)


def find_divergences(records: Sequence[dict[str, Any]], examples: Sequence[Example], engine: Any, tokenizer: Any,
                     tolerance: float | None = None) -> list[dict[str, Any]]:
    by_key = {(e.task, e.id): e for e in examples}
    vanilla = {(r["task"], r["example_id"]): r for r in records if r["method"] == BASELINE and not r.get("skipped")}
    found = []
    for rec in records:
        base = vanilla.get((rec["task"], rec["example_id"]))
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
            entry = {"task": rec["task"], "example_id": rec["example_id"], "method": rec["method"],
                     "turn": turn_no, "position": pos}
            if pos < len(ours["tokens"]) and pos < len(theirs["tokens"]):
                ids = encode_conversation(tokenizer, messages) + theirs["tokens"][:pos]
                engine.reset(capacity=len(ids) + 1)
                logits = engine.forward(ids, logits_rows=slice(-1, None)).logits[-1]
                v_tok, m_tok = theirs["tokens"][pos], ours["tokens"][pos]
                top2 = torch.topk(logits, 2).values
                gap = float(logits[v_tok] - logits[m_tok])
                tol = tie_tolerance(engine.dtype, float(top2[0])) if tolerance is None else tolerance
                entry.update(vanilla_token=v_tok, method_token=m_tok, top2_gap=float(top2[0] - top2[1]),
                             chosen_gap=gap, near_tie=abs(gap) < tol, tolerance=tol)
            else:  # one output is a prefix of the other (e.g. a stop token accepted in a block)
                entry.update(near_tie=False, note="length differs", tolerance=tolerance)
            found.append(entry)
            break
    return found
