"""Metrics computed from results records (never from live objects), so any run can be re-scored.

Definitions follow Spec-Bench where one exists:

* mean accepted length = new tokens / target forward passes while decoding, bonus token
  included, so vanilla is exactly 1.0;
* draft size = draft tokens verified per target forward pass;
* processed per step = tokens each target pass processes beyond the one committed root:
  the drafts plus what a method feeds besides (Lookahead's Jacobi window, FIRP's pseudo
  tokens); this, not the draft size, is what a step costs;
* speedup = method tokens/s / vanilla tokens/s on the same example in the same run (new
  tokens over wall time: equal work even when the two outputs differ in length, as they do
  after a low-precision near-tie or under sampling), aggregated as a geometric mean of
  per-example ratios with a bootstrap 95% interval; ``speedup_total`` is the ratio of
  total tokens/s, and ``speedup_wall_time`` the ratio of wall times, kept for comparison;
* speedup over the common prefix = vanilla's time / the method's time to produce the
  tokens both emitted before their first divergence (from per-step times), which isolates
  the method from what it went on to generate;
* memory bandwidth (as gpt-fast reports it) = weight bytes x target forwards / time;
* host synchronisations per step = reads of tensor values on the host during ``generate``
  (``methods.core.timing.HostSyncs``) / target forward passes: on a GPU each one stalls the
  queue, so a step that reads more is slower there whatever a CPU run shows.

The metrics the field reports beside these (vLLM's spec-decode metrics, SPEED-Bench,
Spec-Bench), read from each step's drafted depth and accepted drafts (records written before
those were recorded have none, and show these as missing):

* draft acceptance rate = accepted draft tokens / drafted depth, summed over steps; depth,
  not node count, because a tree can accept at most one path however wide it is;
* acceptance by draft position k = of the steps whose draft reached position k, the share
  that accepted the draft there (vLLM's per-position rate, over steps of any depth);
* draft and verify shares = drafting and verifying time over their sum (the decode steps'
  time; prefill is neither);
* upper bound = the speedup if every draft were accepted at the measured step cost: per
  example (target passes + drafted depth) / wall time over vanilla's tokens/s, geometric mean
  over the examples the speedup uses; ``bound_reached`` = measured speedup / bound, how far a
  method is from its own ceiling (vanilla's bound is its 1.0).

Under load (``run --concurrency``) every metric above is read from the records of the lowest
level alone (``lowest_level``): one measurement per example and method, as without load. Each
level as a whole is read by ``load_frame``, per method and level:

* throughput = output tokens / the batch's wall time (prefills and waits included), from the
  batch's own summary (a record's ``load``); where several batches served the level (shards,
  Ray workers, a resumed batch served again) their tokens over their summed times;
* speedup at a level = the method's throughput / vanilla's at the same level: both served the
  same requests with the same arrivals, so this is equal work, as the batch-1 headline is.
  Where the methods took turns chunk by chunk (a closed loop, ``harness.runner.run_load``),
  it is the geometric mean over chunks of the method's throughput over vanilla's on the same
  chunk, which cancels the machine's drift between chunks;
* TTFT, TPOT and latency (p50, p90, p99) over the level's requests: seconds to the first token
  (prefill and, in an open loop, the wait for a slot), seconds per output token after the
  first, and seconds from sending to the last token;
* accepted and processed tokens per step: tokens committed, and tokens processed (every
  slot's draft, root and ephemeral tokens), per batched pass over all its sequences;
* memory: the KV cache the batch held and the peak of the device's allocator (a GPU) or of
  the process's resident memory (a CPU); the fitted choice: what ``Decoder.under_load``
  chose at that level (its draft size, tree, and whether it drafted).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from methods.core.fitting import guard_totals

BASELINE = "vanilla"
_NUMERIC = re.compile(r"^-?[\d,]*\.?\d+$")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)


def rouge2(prediction: str, reference: str) -> float:
    """Rouge-2 F1 with stemming (rouge-score); two empty texts count as identical."""
    if not prediction.strip() and not reference.strip():
        return 1.0
    return _scorer().score(reference, prediction)["rouge2"].fmeasure


def is_text_reference(reference: object) -> bool:
    """Rouge makes sense against prose, not against a bare number (GSM8K's reference)."""
    return isinstance(reference, str) and bool(reference.strip()) and not _NUMERIC.match(reference.strip())


def is_numeric_reference(reference: object) -> bool:
    return isinstance(reference, str) and bool(_NUMERIC.match(reference.strip()))


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (task, example, method) that ran, with the totals metrics need."""
    rows = []
    for r in records:
        if r.get("skipped"):
            continue
        turns = r["turns"]
        draft_times = [t.get("draft_time") for t in turns]
        verify_times = [t.get("verify_time") for t in turns]
        rows.append({
            "task": r["task"],
            "example_id": r["example_id"],
            "category": r.get("category"),
            "method": r["method"],
            "reference": r.get("reference"),
            "new_tokens": r["new_tokens"],
            "wall_time": r["wall_time"],
            "target_forwards": r["target_forwards"],
            "draft_tokens": sum(sum(t["draft_sizes"]) for t in turns),
            "processed_tokens": sum(sum(t.get("processed") or t["draft_sizes"]) for t in turns),
            "draft_time": sum(draft_times) if all(x is not None for x in draft_times) and turns else np.nan,
            "verify_time": sum(verify_times) if all(x is not None for x in verify_times) and turns else np.nan,
            "host_syncs": (sum(t["host_syncs"] for t in turns)
                           if turns and all(t.get("host_syncs") is not None for t in turns) else np.nan),
            "accepted": [a for t in turns for a in t["accepted"]],
            "step_times": _step_times(turns),
            "draft_sizes": [d for t in turns for d in t["draft_sizes"]],
            "draft_depths": _per_step(turns, "draft_depths"),
            "accepted_drafts": _per_step(turns, "accepted_drafts"),
            "token_ids": tuple(tok for t in turns for tok in t["tokens"]),
            "text": "\n\n".join(t["text"] for t in turns),
        })
    return pd.DataFrame(rows)


def _per_step(turns: list[dict[str, Any]], key: str) -> list[int] | None:
    """A per-step list across turns, or None where a turn did not record it (an older record):
    a metric over part of a record's steps would be a different metric, not a partial one."""
    if not turns or any(t.get(key) is None for t in turns):
        return None
    return [x for t in turns for x in t[key]]


def _step_times(turns: list[dict[str, Any]]) -> list[float] | None:
    """Seconds per target forward across turns, or None where a turn did not record them."""
    if not turns or any(t.get("step_times") is None for t in turns):
        return None
    return [x for t in turns for x in t["step_times"]]


def time_to_tokens(accepted: Sequence[int], step_times: Sequence[float], n: int) -> float:
    """Seconds until at least ``n`` tokens were committed (the step that crosses ``n`` counts whole)."""
    done, elapsed = 0, 0.0
    for a, t in zip(accepted, step_times):
        if done >= n:
            break
        done += a
        elapsed += t
    return elapsed


def geometric_mean(values: Iterable[float]) -> float:
    vals = np.asarray([v for v in values if v > 0 and math.isfinite(v)], dtype=float)
    return float(np.exp(np.log(vals).mean())) if len(vals) else float("nan")


def bootstrap_geomean_ci(values: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the geometric mean (seeded: reports are reproducible)."""
    logs = np.log(np.asarray([v for v in values if v > 0 and math.isfinite(v)], dtype=float))
    if len(logs) == 0:
        return float("nan"), float("nan")
    if len(logs) == 1:
        return float(np.exp(logs[0])), float(np.exp(logs[0]))
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, len(logs), size=(resamples, len(logs)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(np.exp(lo)), float(np.exp(hi))


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


MAX_POSITION = 16  # positions charted; no shipped draft reaches this deep


def acceptance_by_position(draft_depths: Sequence[int], accepted_drafts: Sequence[int],
                           max_position: int = MAX_POSITION) -> list[float]:
    """Per draft position k = 1, 2, ...: of the steps whose draft reached position k, the share
    that accepted the draft token there (vLLM's per-position acceptance rate).

    A step of depth d counts at positions 1..d only, so a method whose drafts vary in depth
    (a dynamic tree, an adaptive exit, a lookup that finds short matches) is not charged for
    positions it never drafted. The list ends at the deepest position any step reached;
    empty when no step drafted.
    """
    depths = np.asarray(draft_depths, dtype=int)
    accepted = np.asarray(accepted_drafts, dtype=int)
    deepest = min(int(depths.max()) if len(depths) else 0, max_position)
    return [float((accepted[depths >= k] >= k).mean()) for k in range(1, deepest + 1)]


def draft_acceptance_rate(draft_depths: Sequence[int], accepted_drafts: Sequence[int]) -> float:
    """Accepted draft tokens / drafted depth over all steps; NaN when nothing was drafted."""
    drafted = int(np.sum(draft_depths)) if len(draft_depths) else 0
    return float(np.sum(accepted_drafts)) / drafted if drafted else float("nan")


def paired_with_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Each row joined with the vanilla row of the same example (inner join)."""
    keys = ["task", "example_id"]
    cols = ["wall_time", "token_ids", "text", "new_tokens", "accepted", "step_times"]
    base = frame.loc[frame.method == BASELINE, [*keys, *cols]].rename(columns={c: f"{c}_base" for c in cols})
    return frame.merge(base, on=keys, how="inner")


SPEEDUP_KEYS = ("speedup_geomean", "speedup_ci_low", "speedup_ci_high", "speedup_total", "speedup_wall_time",
                "speedup_excluded", "speedup_prefix", "prefix_examples", "speedup_bound", "bound_reached")
MIN_PREFIX = 16  # tokens: shorter common prefixes are mostly prefill and say little about decoding


def paired_speedups(paired: pd.DataFrame, min_prefix: int = MIN_PREFIX) -> dict[str, float]:
    """Speedups of one method's rows joined with vanilla's (see the module docstring for definitions).

    Examples where either side produced no tokens (or took no time) have no tokens/s: they
    are left out and counted in ``speedup_excluded``, never divided by.
    """
    ok = (paired.new_tokens > 0) & (paired.new_tokens_base > 0) & (paired.wall_time > 0) & (paired.wall_time_base > 0)
    used = paired[ok]
    tps = used.new_tokens / used.wall_time
    tps_base = used.new_tokens_base / used.wall_time_base
    ratios = (tps / tps_base).tolist()
    low, high = bootstrap_geomean_ci(ratios)
    out = {
        "speedup_geomean": geometric_mean(ratios),
        "speedup_ci_low": low,
        "speedup_ci_high": high,
        "speedup_total": (float((used.new_tokens.sum() / used.wall_time.sum())
                                / (used.new_tokens_base.sum() / used.wall_time_base.sum())) if len(used) else float("nan")),
        "speedup_wall_time": geometric_mean((used.wall_time_base / used.wall_time).tolist()),
        "speedup_excluded": int((~ok).sum()),
    }
    prefix_ratios = []
    for r in used.itertuples():
        if r.step_times is None or r.step_times_base is None:
            continue
        div = first_divergence(r.token_ids, r.token_ids_base)
        common = len(r.token_ids) if div is None else div
        if common < min_prefix:
            continue
        t_method = time_to_tokens(r.accepted, r.step_times, common)
        t_base = time_to_tokens(r.accepted_base, r.step_times_base, common)
        if t_method > 0 and t_base > 0:
            prefix_ratios.append(t_base / t_method)
    out["speedup_prefix"] = geometric_mean(prefix_ratios)
    out["prefix_examples"] = len(prefix_ratios)
    out["speedup_bound"], out["bound_reached"] = float("nan"), float("nan")
    if "draft_depths" in used and len(used) and used.draft_depths.map(lambda d: isinstance(d, list)).all():
        # every draft accepted: each pass commits its drafted depth plus the bonus token
        ceiling = (used.target_forwards + used.draft_depths.map(sum)) / used.wall_time
        out["speedup_bound"] = geometric_mean((ceiling / tps_base).tolist())
        out["bound_reached"] = out["speedup_geomean"] / out["speedup_bound"]
    return out


def summarize(frame: pd.DataFrame, by: tuple[str, ...] = ("method",), weight_bytes: int | None = None) -> pd.DataFrame:
    """Per-group metrics; speedups and exact match are paired with vanilla on the same examples."""
    if frame.empty:
        return pd.DataFrame()
    paired_all = paired_with_baseline(frame)
    out = []
    for group, sub in frame.groupby(list(by), sort=False):
        group = group if isinstance(group, tuple) else (group,)
        row: dict[str, Any] = dict(zip(by, group))
        time_total = float(sub.wall_time.sum())
        forwards = int(sub.target_forwards.sum())
        new = int(sub.new_tokens.sum())
        row.update(
            examples=len(sub),
            new_tokens=new,
            wall_time=time_total,
            tokens_per_s=new / time_total if time_total > 0 else float("nan"),
            mean_accepted_length=new / forwards if forwards else float("nan"),
            draft_size=float(sub.draft_tokens.sum()) / forwards if forwards else float("nan"),
            processed_per_step=float(sub.processed_tokens.sum()) / forwards if forwards else float("nan"),
            forwards_per_token=forwards / new if new else float("nan"),
            syncs_per_step=(float(sub.host_syncs.sum()) / forwards
                            if forwards and sub.host_syncs.notna().all() else float("nan")),
            draft_time_share=float(sub.draft_time.sum() / time_total) if sub.draft_time.notna().all() and time_total else float("nan"),
            bandwidth_gb_s=(weight_bytes * forwards / time_total / 1e9) if weight_bytes and time_total else float("nan"),
        )
        row.update(draft_metrics(sub))
        mask = np.ones(len(paired_all), dtype=bool)
        for k, v in zip(by, group):
            mask &= (paired_all[k] == v).to_numpy()
        paired = paired_all[mask]
        if len(paired):
            row.update(paired_speedups(paired))
            row["exact_match"] = float((paired.token_ids == paired.token_ids_base).mean())
            row["length_differs"] = int((paired.new_tokens != paired.new_tokens_base).sum())
            row["rouge2_vs_vanilla"] = float(np.mean([rouge2(a, b) for a, b in zip(paired.text, paired.text_base)]))
        else:
            for k in (*SPEEDUP_KEYS, "exact_match", "length_differs", "rouge2_vs_vanilla"):
                row[k] = float("nan")
        texts = sub[sub.reference.map(is_text_reference)]
        row["rouge2"] = (float(np.mean([rouge2(t, r) for t, r in zip(texts.text, texts.reference)]))
                         if len(texts) else float("nan"))
        row["answer_accuracy"] = _answer_accuracy(sub)
        out.append(row)
    return pd.DataFrame(out)


def draft_metrics(sub: pd.DataFrame) -> dict[str, Any]:
    """The field's draft metrics of one group of rows (module docstring); NaN, and an empty
    per-position list, where a row lacks the per-step drafted depths (an older record)."""
    out: dict[str, Any] = {"draft_depth_per_step": float("nan"), "accepted_drafts_per_step": float("nan"),
                           "draft_acceptance_rate": float("nan"), "acceptance_by_position": []}
    spent = sub.draft_time + sub.verify_time
    out["draft_share"] = (float(sub.draft_time.sum() / spent.sum())
                          if spent.notna().all() and spent.sum() > 0 else float("nan"))
    out["verify_share"] = 1.0 - out["draft_share"]
    recorded = sub.draft_depths.map(lambda d: isinstance(d, list)) & sub.accepted_drafts.map(lambda d: isinstance(d, list))
    if not len(sub) or not recorded.all():
        return out
    depths = [d for x in sub.draft_depths for d in x]
    accepted = [a for x in sub.accepted_drafts for a in x]
    forwards = int(sub.target_forwards.sum())
    if forwards:
        out["draft_depth_per_step"] = sum(depths) / forwards
        out["accepted_drafts_per_step"] = sum(accepted) / forwards
    out["draft_acceptance_rate"] = draft_acceptance_rate(depths, accepted)
    out["acceptance_by_position"] = acceptance_by_position(depths, accepted)
    return out


def in_run_order(summary: pd.DataFrame, methods: list[str] | None) -> pd.DataFrame:
    """Rows in task order of first appearance, then in the run's --methods order (vanilla first)."""
    if summary.empty:
        return summary
    tasks = list(dict.fromkeys(summary.task)) if "task" in summary else []
    methods = list(methods or []) + [m for m in dict.fromkeys(summary.method) if m not in (methods or [])]
    key = summary.apply(lambda r: (tasks.index(r.task) if tasks else 0, methods.index(r.method)), axis=1)
    return summary.assign(_key=key).sort_values("_key", kind="stable").drop(columns="_key").reset_index(drop=True)


def _answer_accuracy(sub: pd.DataFrame) -> float:
    """GSM8K-style accuracy over rows whose reference is a bare number."""
    from tasks.gsm8k import extract_answer, normalize_number

    numeric = sub[sub.reference.map(is_numeric_reference)]
    if not len(numeric):
        return float("nan")
    hits = [extract_answer(t) == normalize_number(str(r)) for t, r in zip(numeric.text, numeric.reference)]
    return float(np.mean(hits))


CROSSOVER = 1.05  # the speedup under which speculation is said to stop paying


def lowest_level(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records the one-request metrics read: all of a run made without load; of a load run,
    those of its lowest concurrency level, so each example and method counts once."""
    records = list(records)
    levels = [r["concurrency"] for r in records if r.get("concurrency") is not None]
    if not levels:
        return records
    low = min(levels)
    return [r for r in records if r.get("concurrency") in (None, low)]


def guard_by_method(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per method with a rate guard, its drafted and plain steps summed over the timed
    generations of ``records``: a record's own (``guard``), or under load its batch's, counted
    once per batch (the slots share one guard). Warm-ups are not in them, and the sum is over
    the records, so it holds for shards, Ray workers and resumed runs alike."""
    parts: dict[str, list[dict[str, int] | None]] = {}
    batches: set[tuple[str, Any, Any]] = set()
    for r in records:
        load = r.get("load")
        if load is not None:
            batch = (r["method"], r.get("concurrency"), load.get("chunk"))
            if batch in batches:
                continue
            batches.add(batch)
        parts.setdefault(r["method"], []).append((load if load is not None else r).get("guard"))
    return {method: total for method, found in parts.items() if (total := guard_totals(found)) is not None}


def load_levels(records: Iterable[dict[str, Any]]) -> list[int]:
    """The concurrency levels a run's records hold, ascending (empty without load)."""
    return sorted({r["concurrency"] for r in records if r.get("concurrency") is not None})


def _percentiles(values: Sequence[float], prefix: str) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {f"{prefix}_p{q}": (float(np.percentile(arr, q)) if len(arr) else float("nan")) for q in (50, 90, 99)}


def load_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (method, concurrency level) of a load run (module docstring), in the order the
    methods first appear, levels ascending; empty for a run made without load."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("concurrency") is not None and not r.get("skipped") and r.get("load"):
            groups.setdefault((r["method"], r["concurrency"]), []).append(r)
    rows = []
    for (method, level), recs in groups.items():
        batches = list({json.dumps(r["load"], sort_keys=True): r["load"] for r in recs}.values())
        tokens = sum(b["output_tokens"] for b in batches)
        seconds = sum(b["wall_time"] for b in batches)
        steps = sum(b["steps"] for b in batches)
        turns = [t for r in recs for t in r["turns"]]
        memory = [b.get("memory") or {} for b in batches]
        peak = [m.get("peak_device_bytes", m.get("peak_rss_bytes")) for m in memory]
        rows.append({
            "method": method, "concurrency": level, "requests": len(recs), "batches": len(batches),
            "output_tokens": tokens, "wall_time": seconds,
            "throughput": tokens / seconds if seconds > 0 else float("nan"),
            "mean_batch": sum(b["mean_batch"] * b["steps"] for b in batches) / steps if steps else float("nan"),
            "accepted_per_step": (sum(b["accepted_per_step"] * b["steps"] for b in batches) / steps
                                  if steps else float("nan")),
            "processed_per_step": (sum(b["processed_per_step"] * b["steps"] for b in batches) / steps
                                   if steps else float("nan")),
            **_percentiles([t["ttft"] for t in turns if t.get("ttft") is not None], "ttft"),
            **_percentiles([t["tpot"] for t in turns if t.get("tpot") is not None], "tpot"),
            **_percentiles([t["wall_time"] for t in turns], "latency"),
            "peak_memory_bytes": max((p for p in peak if p is not None), default=float("nan")),
            "kv_cache_bytes": max((m.get("kv_cache_bytes", 0) for m in memory), default=float("nan")),
            "choice": batches[-1].get("choice") or {},
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    methods = list(dict.fromkeys(frame.method))
    frame = frame.assign(_m=frame.method.map(methods.index)).sort_values(["_m", "concurrency"]).drop(columns="_m")
    base = frame[frame.method == BASELINE].set_index("concurrency").throughput
    frame["speedup"] = [t / base[c] if c in base.index and base[c] > 0 else float("nan")
                        for t, c in zip(frame.throughput, frame.concurrency)]
    paired = _chunk_speedups(groups)
    frame["speedup"] = [paired.get((m, c), s) for m, c, s in zip(frame.method, frame.concurrency, frame.speedup)]
    return frame.reset_index(drop=True)


def _chunk_speedups(groups: dict[tuple[str, int], list[dict[str, Any]]]) -> dict[tuple[str, int], float]:
    """Per (method, level) whose batches are chunks (``load.chunk``) that vanilla served too: the
    geometric mean over chunks of the method's throughput over vanilla's on the same chunk.
    The methods took turns chunk by chunk, so each pair ran seconds apart, and the ratio
    within a pair cancels the machine's drift that a ratio of whole-run sums keeps."""
    def chunks(recs: list[dict[str, Any]]) -> dict[str, float]:
        return {r["load"]["chunk"]: r["load"]["throughput"] for r in recs if r["load"].get("chunk") is not None}

    out: dict[tuple[str, int], float] = {}
    for (method, level), recs in groups.items():
        mine, base = chunks(recs), chunks(groups.get((BASELINE, level), []))
        logs = [math.log(t / base[k]) for k, t in mine.items() if k in base and t > 0 and base[k] > 0]
        if logs and len(logs) == len(mine):
            out[method, level] = math.exp(sum(logs) / len(logs))
    return out


def crossovers(load: pd.DataFrame, threshold: float = CROSSOVER) -> dict[str, int | None]:
    """Per method but vanilla: the lowest level at which its speedup falls under ``threshold``
    (where speculation stops paying), None where it stays above at every level measured."""
    out: dict[str, int | None] = {}
    for method, sub in load.groupby("method", sort=False):
        if method == BASELINE:
            continue
        under = sub[sub.speedup < threshold].concurrency
        out[method] = int(under.min()) if len(under) else None
    return out


def choice_text(choice: dict[str, Any]) -> str:
    """What a fitted method chose at a level, in a few words: plain steps, or its draft size or tree."""
    if not choice:
        return "-"
    fit = choice.get("fitted")
    if isinstance(fit, dict) and not fit.get("drafting", True):
        return "plain steps"
    parts = []
    if choice.get("tree") is not None:
        parts.append(f"tree {choice['tree']}")
    if choice.get("draft_size") is not None:
        parts.append(f"draft {choice['draft_size']}")
    return ", ".join(parts) or "-"
