"""The run report as one self-contained HTML file (inline CSS and SVG, no scripts, no fonts,
no network requests), readable on a laptop and printable.

This module only renders: ``harness.report`` reads a run folder, computes the metrics and
hands them here, so reports depend on nothing above them.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape


TEMPLATES = Path(__file__).parent / "templates"
BASELINE = "vanilla"


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) + suffix


def _isnan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def first_char_divergence(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def highlight(text: str, at: int | None) -> str:
    """Escaped text with everything from the first divergence marked."""
    if at is None:
        return html.escape(text)
    return html.escape(text[:at]) + '<mark class="diverge">' + html.escape(text[at:]) + "</mark>"


def summary_rows(summary: pd.DataFrame) -> list[dict[str, str]]:
    rows = []
    for r in summary.itertuples():
        rows.append({
            "task": r.task, "method": r.method, "examples": r.examples,
            "speedup": fmt(r.speedup_geomean, ".2f", "x"),
            "ci": f"[{fmt(r.speedup_ci_low, '.2f')}, {fmt(r.speedup_ci_high, '.2f')}]",
            "speedup_total": fmt(r.speedup_total, ".2f", "x"),
            "speedup_wall": fmt(r.speedup_wall_time, ".2f", "x"),
            "speedup_prefix": (fmt(r.speedup_prefix, ".2f", "x") + f" ({r.prefix_examples:.0f})"
                               if not _isnan(r.speedup_prefix) else "–"),
            "length_differs": fmt(r.length_differs, ".0f"),
            "mal": fmt(r.mean_accepted_length, ".2f"),
            "draft": fmt(r.draft_size, ".1f"),
            "processed": fmt(r.processed_per_step, ".1f"),
            "rouge2": fmt(r.rouge2, ".3f"),
            "rouge2_vanilla": fmt(r.rouge2_vs_vanilla, ".3f"),
            "exact": fmt(r.exact_match, ".0%") if not math.isnan(r.exact_match) else "–",
            "accuracy": fmt(r.answer_accuracy, ".0%") if not math.isnan(r.answer_accuracy) else "–",
            "tps": fmt(r.tokens_per_s, ".1f"),
            "bandwidth": fmt(r.bandwidth_gb_s, ".1f", " GB/s"),
            "draft_share": fmt(r.draft_time_share, ".0%") if not math.isnan(r.draft_time_share) else "–",
            "lossy": (not math.isnan(r.exact_match)) and r.exact_match < 1.0,
        })
    return rows


def draft_rows(summary: pd.DataFrame) -> list[dict[str, str]]:
    """The drafts table: per task and method that drafts (vanilla is the baseline, not a drafter),
    how deep it drafts, how much of that is accepted, where its step time goes, and how far its
    speedup is from its own ceiling. Older records lack the per-step depths: "–" there."""
    rows = []
    for r in summary.itertuples():
        if r.method == BASELINE:
            continue
        positions = list(r.acceptance_by_position or [])
        rows.append({
            "task": r.task, "method": r.method,
            "depth": fmt(r.draft_depth_per_step, ".2f"),
            "accepted": fmt(r.accepted_drafts_per_step, ".2f"),
            "rate": fmt(r.draft_acceptance_rate, ".0%"),
            "first": fmt(positions[0], ".0%") if positions else "–",
            "draft_share": fmt(r.draft_share, ".0%"),
            "verify_share": fmt(r.verify_share, ".0%"),
            "speedup": fmt(r.speedup_geomean, ".2f", "x"),
            "bound": fmt(r.speedup_bound, ".2f", "x"),
            "reached": fmt(r.bound_reached, ".0%"),
        })
    return rows


def _bytes(value: Any) -> str:
    if _isnan(value):
        return "–"
    return f"{value / 1e9:.2f} GB" if value >= 1e9 else f"{value / 1e6:.1f} MB"


def _ms(values: list[Any]) -> str:
    """Seconds as milliseconds, p50 / p90 / p99 in one cell."""
    return " / ".join(fmt(1000 * v if not _isnan(v) else v, ".1f") for v in values)


def load_rows(load: pd.DataFrame, crossover: dict[str, int | None]) -> list[dict[str, Any]]:
    """The "Under load" table: per method and level, throughput, speedup over vanilla at that level,
    request times, per-step work, memory and what the fitted method chose; ``crossover`` marks
    the row where a method first falls under the threshold."""
    rows = []
    for r in load.itertuples():
        rows.append({
            "method": r.method, "level": r.concurrency, "requests": r.requests,
            "throughput": fmt(r.throughput, ".1f"),
            "speedup": fmt(r.speedup, ".2f", "x") if r.method != BASELINE else "1.00x",
            "ttft": _ms([r.ttft_p50, r.ttft_p90, r.ttft_p99]),
            "tpot": _ms([r.tpot_p50, r.tpot_p90, r.tpot_p99]),
            "latency": _ms([r.latency_p50, r.latency_p90, r.latency_p99]),
            "batch": fmt(r.mean_batch, ".1f"),
            "accepted": fmt(r.accepted_per_step, ".2f"),
            "processed": fmt(r.processed_per_step, ".1f"),
            "peak": _bytes(r.peak_memory_bytes), "kv": _bytes(r.kv_cache_bytes),
            "choice": r.choice_text,
            "crossover": crossover.get(r.method) == r.concurrency,
        })
    return rows


def render_report(*, run_dir: str, manifest: dict[str, Any], summary: pd.DataFrame, charts: dict[str, str],
                  categories: dict[str, Any], divergences: list[dict[str, Any]], verdicts: list[dict[str, Any]],
                  colors: dict[str, str], headline: str, examples: list[dict[str, Any]],
                  method_sections: list[dict[str, Any]], skipped: int,
                  training: list[dict[str, Any]] | None = None, hardware: dict[str, Any] | None = None,
                  fitted: list[dict[str, Any]] | None = None, drafters: list[dict[str, Any]] | None = None,
                  claims: list[Any] | None = None, load: dict[str, Any] | None = None) -> str:
    """``verdicts``: per-method divergence counts; ``colors``: the palette every chart used, for the swatches;
    ``hardware``: the machine's label and the baseline against the bandwidth limit; ``fitted``: the
    methods that sized their drafts to the machine, drafting or taking plain steps; ``claims``: rows
    with ``claim``, ``numbers``, ``verdict`` and ``needed`` (the FIRP paper's claims, when FIRP ran);
    ``load``: the "Under load" section of a run of several concurrency levels (``frame``, the
    ``crossover`` level per method, its ``threshold``, ``charts``, the ``levels`` and ``lowest``)."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "jinja"]))
    return env.get_template("report.html.jinja").render(
        divergences=divergences, verdicts=verdicts, colors=colors, headline=headline, training=training or [],
        fitted=fitted or [], drafters=drafters or [], claims=claims or [],
        load=({**load, "rows": load_rows(load["frame"], load["crossover"])} if load else None),
        hardware=hardware or {},
        real_divergences=sum(v["real"] for v in verdicts), method_sections=method_sections, run_dir=run_dir, manifest=manifest,
        rows=summary_rows(summary) if not summary.empty else [], charts=charts,
        draft_table=draft_rows(summary) if not summary.empty else [], categories=categories,
        examples=examples, skipped=skipped, manifest_json=json.dumps(manifest, indent=2, ensure_ascii=False),
    )


def render_comparison(*, run_a: str, run_b: str, rows: list[dict[str, Any]], metrics: list[str], rel_tol: float) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "jinja"]))
    return env.get_template("compare.html.jinja").render(run_a=run_a, run_b=run_b, rows=rows, metrics=metrics,
                                                         rel_tol=rel_tol)
