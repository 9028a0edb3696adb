"""The terminal summary printed at the end of ``run``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from harness.metrics import (CROSSOVER, choice_text, crossovers, in_run_order, load_frame, load_levels, lowest_level,
                             records_frame, summarize)
from harness.results import read_run_divergences, read_run_records


# Headers on two lines, numbers never wrapped, names folded: the table fits 100 columns.
HEADERS = ["task", "method", "n", "tokens\n/s", "speedup\n/token", "speedup\ntotal", "acc.\nlength",
           "draft\n/step", "proc.\n/step", "exact\nmatch", "len.\ndiffers"]


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_summary(run_dir: Path, console: Console | None = None) -> None:
    if console is None:  # a pipe or CI log would otherwise get rich's 80-column fallback
        console = Console() if sys.stdout.isatty() else Console(width=100)
    every = read_run_records(run_dir)
    records = lowest_level(every)
    frame = records_frame(records)
    skipped = sum(1 for r in records if r.get("skipped"))
    if frame.empty:
        console.print("No completed generations to summarise.")
        return
    table = Table(title=f"Summary: {run_dir}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
    for col in HEADERS:
        text = col in ("task", "method")
        # Names fold onto a second line rather than lose their end to an ellipsis; numbers never wrap.
        table.add_column(col, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    methods = list(dict.fromkeys(["vanilla", *frame.method]))
    per_task = in_run_order(summarize(frame, by=("task", "method")), methods)
    overall = in_run_order(summarize(frame, by=("method",)).assign(task="all"), methods)
    tasks = per_task.task.unique()
    rows = [per_task, overall] if len(tasks) > 1 else [per_task]
    for part in rows:
        for r in part.itertuples():
            table.add_row(
                str(r.task), str(r.method), str(r.examples), _fmt(r.tokens_per_s, ".1f"),
                _fmt(r.speedup_geomean, ".2f") + ("x" if not math.isnan(r.speedup_geomean) else ""),
                _fmt(r.speedup_total, ".2f") + ("x" if not math.isnan(r.speedup_total) else ""),
                _fmt(r.mean_accepted_length, ".2f"), _fmt(r.draft_size, ".1f"), _fmt(r.processed_per_step, ".1f"),
                _fmt(r.exact_match, ".0%"), _fmt(r.length_differs, ".0f"),
            )
        if part is not rows[-1]:
            table.add_section()
    console.print(table)
    console.print("speedup/token: geometric mean over examples of (method tokens/s) / (vanilla tokens/s) on the "
                  "same example; total: ratio of total tokens/s. Per token, so outputs of different lengths "
                  "compare equal work. acc. length: new tokens per target pass. draft/step: draft tokens "
                  "verified per step; proc./step: tokens each target pass processes beyond the committed one "
                  "(drafts plus e.g. Lookahead's window or FIRP's pseudo tokens), the cost of a step. len. differs: "
                  "examples whose output length differs from vanilla's.")
    if len(load_levels(every)) > 1:
        print_load(every, methods, console)
    print_divergences(run_dir, console)
    if skipped:
        console.print(f"[yellow]{skipped} generation(s) skipped (prompt too long for the model context).[/]")


LOAD_HEADERS = ["method", "conc.", "tokens\n/s", "speedup", "TTFT\np50 ms", "TPOT\np50 ms", "latency\np90 ms",
                "acc.\n/step", "proc.\n/step", "fitted\nchoice"]


def print_load(records: list[dict], methods: list[str], console: Console) -> None:
    """The load sweep per method and level (``harness.metrics.load_frame``), and where each method
    first falls under ``CROSSOVER`` times vanilla's throughput."""
    frame = load_frame(records)
    if frame.empty:
        return
    order = {m: i for i, m in enumerate([*methods, *frame.method])}
    frame = frame.assign(_m=frame.method.map(order)).sort_values(["_m", "concurrency"], kind="stable")
    table = Table(title="Under load (each example one request: its first turn)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in LOAD_HEADERS:
        text = col in ("method", "fitted\nchoice")
        table.add_column(col, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    previous = None
    for r in frame.itertuples():
        if previous is not None and r.method != previous:
            table.add_section()
        previous = r.method
        table.add_row(str(r.method), str(r.concurrency), _fmt(r.throughput, ".1f"),
                      _fmt(r.speedup, ".2f") + ("x" if not math.isnan(r.speedup) else ""),
                      _fmt(1000 * r.ttft_p50, ".1f"), _fmt(1000 * r.tpot_p50, ".1f"), _fmt(1000 * r.latency_p90, ".1f"),
                      _fmt(r.accepted_per_step, ".2f"), _fmt(r.processed_per_step, ".1f"), choice_text(r.choice))
    console.print(table)
    falls = [f"{m} at {level}" if level is not None else f"{m} never" for m, level in crossovers(frame).items()]
    console.print(f"tokens/s: output tokens over the batches' wall time; speedup: over vanilla's tokens/s at the same "
                  f"level on the same requests (closed loop: geometric mean over the batches the methods served in "
                  f"turn). acc./proc. per step: tokens committed / processed by one batched pass.")
    console.print(f"Under {CROSSOVER:.2f}x from concurrency: {', '.join(falls) or '-'}.")


def print_divergences(run_dir: Path, console: Console) -> None:
    """One line on losslessness; a real discrepancy is said loudly, one line per case."""
    from harness.divergence import real_divergences

    if not any(run_dir.glob("divergences*.jsonl")):  # decoding has not finished: nothing judged yet
        return
    divergences = read_run_divergences(run_dir)
    real = real_divergences(divergences)
    numerics = sum(1 for d in divergences if d.get("verdict") == "numerics" or
                   ("verdict" not in d and d.get("near_tie")))
    console.print(f"Losslessness: {len(divergences)} divergence(s) from vanilla, {numerics} explained by numerics, "
                  f"{len(real)} real.")
    for d in real:
        where = (f"float32 gap {d['reference_gap']:.4f} > twice the low-precision error {d['error']:.4f}"
                 if d.get("error") is not None else f"gap {d.get('chosen_gap', float('nan')):.4f}")
        level = f" at concurrency {d['concurrency']}" if d.get("concurrency") is not None else ""
        console.print(f"[bold red]REAL DISCREPANCY: {d['method']}{level} on {d['task']}/{d['example_id']} at token "
                      f"{d['position']} (turn {d['turn']}): {where}; greedy output should equal vanilla's[/]")
