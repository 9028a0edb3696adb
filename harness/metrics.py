"""Metrics computed from results records (never from live objects), so any run can be re-scored.

Definitions follow Spec-Bench where one exists:

* mean accepted length = new tokens / target forward passes while decoding, bonus token
  included, so vanilla is exactly 1.0;
* draft size = draft tokens verified per target forward pass;
* speedup = vanilla wall time / method wall time on the same example in the same run,
  aggregated as a geometric mean (per-example ratios) and as a total-time ratio.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

BASELINE = "vanilla"


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (task, example, method) that ran, with the totals metrics need."""
    rows = []
    for r in records:
        if r.get("skipped"):
            continue
        turns = r["turns"]
        rows.append({
            "task": r["task"],
            "example_id": r["example_id"],
            "category": r.get("category"),
            "method": r["method"],
            "new_tokens": r["new_tokens"],
            "wall_time": r["wall_time"],
            "target_forwards": r["target_forwards"],
            "draft_tokens": sum(sum(t["draft_sizes"]) for t in turns),
            "token_ids": tuple(tok for t in turns for tok in t["tokens"]),
        })
    return pd.DataFrame(rows)


def geometric_mean(values: Iterable[float]) -> float:
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def summarize(frame: pd.DataFrame, by: tuple[str, ...] = ("method",)) -> pd.DataFrame:
    """Per-group totals and ratios; speedups are paired with vanilla on the same examples."""
    if frame.empty:
        return pd.DataFrame()
    keys = ["task", "example_id"]
    base = frame.loc[frame.method == BASELINE, [*keys, "wall_time", "token_ids"]].rename(
        columns={"wall_time": "wall_time_base", "token_ids": "token_ids_base"})
    out = []
    for group, sub in frame.groupby(list(by), sort=False):
        group = group if isinstance(group, tuple) else (group,)
        row: dict[str, Any] = dict(zip(by, group))
        time_total = sub.wall_time.sum()
        forwards = sub.target_forwards.sum()
        row.update(
            examples=len(sub),
            new_tokens=int(sub.new_tokens.sum()),
            tokens_per_s=sub.new_tokens.sum() / time_total if time_total > 0 else float("nan"),
            mean_accepted_length=sub.new_tokens.sum() / forwards if forwards else float("nan"),
            draft_size=sub.draft_tokens.sum() / forwards if forwards else float("nan"),
        )
        paired = sub.merge(base, on=keys, how="inner")
        if len(paired):
            row["speedup_geomean"] = geometric_mean(paired.wall_time_base / paired.wall_time)
            row["speedup_total_time"] = paired.wall_time_base.sum() / paired.wall_time.sum()
            row["exact_match"] = float((paired.token_ids == paired.token_ids_base).mean())
        else:
            row["speedup_geomean"] = row["speedup_total_time"] = row["exact_match"] = float("nan")
        out.append(row)
    return pd.DataFrame(out)
