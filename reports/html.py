"""``python -m harness report RUN_DIR``: one self-contained HTML file (inline CSS and SVG,
no scripts, no fonts, no network requests), readable on a laptop and printable."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from harness.metrics import BASELINE, first_divergence, in_run_order, records_frame, summarize
from harness.results import DIVERGENCES_FILE, RESULTS_FILE, read_manifest, read_records
from reports import plots

TEMPLATES = Path(__file__).parent / "templates"


def _num(value: Any, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) + suffix


def _isnan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _first_char_divergence(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _highlight(text: str, at: int | None) -> str:
    """Escaped text with everything from the first divergence marked."""
    if at is None:
        return html.escape(text)
    return html.escape(text[:at]) + '<mark class="diverge">' + html.escape(text[at:]) + "</mark>"


def drilldown(frame: pd.DataFrame, records: list[dict[str, Any]], limit: int = 200) -> list[dict[str, Any]]:
    """Per example: every method's output side by side, divergences from vanilla highlighted."""
    by_example: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        by_example.setdefault((r["task"], r["example_id"]), []).append(r)
    items = []
    for (task, example_id), recs in list(by_example.items())[:limit]:
        base = next((r for r in recs if r["method"] == BASELINE), None)
        base_text = "\n\n".join(t["text"] for t in base["turns"]) if base else None
        base_ids = [x for t in base["turns"] for x in t["tokens"]] if base else None
        outputs = []
        for r in sorted(recs, key=lambda r: (r["method"] != BASELINE, r["method"])):
            if r.get("skipped"):
                outputs.append({"method": r["method"], "html": f"<em>skipped: {html.escape(r['skipped'])}</em>",
                                "steps": "", "status": "skipped"})
                continue
            text = "\n\n".join(t["text"] for t in r["turns"])
            ids = [x for t in r["turns"] for x in t["tokens"]]
            token_div = first_divergence(ids, base_ids) if base_ids is not None and r["method"] != BASELINE else None
            char_div = _first_char_divergence(text, base_text) if token_div is not None else None
            accepted = [a for t in r["turns"] for a in t["accepted"]]
            length = f"{r['new_tokens']} tokens" + (
                f" (vanilla {len(base_ids)})" if base_ids is not None and r["method"] != BASELINE
                and len(base_ids) != r["new_tokens"] else "")
            outputs.append({
                "length": length,
                "method": r["method"],
                "html": _highlight(text, char_div),
                "steps": " ".join(str(a) for a in accepted),
                "status": "identical to vanilla" if token_div is None and r["method"] != BASELINE else (
                    f"diverges at token {token_div}" if token_div is not None else "baseline"),
                "time": _num(r["wall_time"], ".2f", " s"),
                "tokens": r["new_tokens"],
            })
        items.append({"task": task, "example_id": example_id, "category": recs[0].get("category"),
                      "diverged": any("diverges" in o["status"] for o in outputs), "outputs": outputs})
    return items


def summary_rows(summary: pd.DataFrame) -> list[dict[str, str]]:
    rows = []
    for r in summary.itertuples():
        rows.append({
            "task": r.task, "method": r.method, "examples": r.examples,
            "speedup": _num(r.speedup_geomean, ".2f", "x"),
            "ci": f"[{_num(r.speedup_ci_low, '.2f')}, {_num(r.speedup_ci_high, '.2f')}]",
            "speedup_total": _num(r.speedup_total, ".2f", "x"),
            "speedup_wall": _num(r.speedup_wall_time, ".2f", "x"),
            "speedup_prefix": (_num(r.speedup_prefix, ".2f", "x") + f" ({r.prefix_examples:.0f})"
                               if not _isnan(r.speedup_prefix) else "–"),
            "length_differs": _num(r.length_differs, ".0f"),
            "mal": _num(r.mean_accepted_length, ".2f"),
            "draft": _num(r.draft_size, ".1f"),
            "rouge2": _num(r.rouge2, ".3f"),
            "rouge2_vanilla": _num(r.rouge2_vs_vanilla, ".3f"),
            "exact": _num(r.exact_match, ".0%") if not math.isnan(r.exact_match) else "–",
            "accuracy": _num(r.answer_accuracy, ".0%") if not math.isnan(r.answer_accuracy) else "–",
            "tps": _num(r.tokens_per_s, ".1f"),
            "bandwidth": _num(r.bandwidth_gb_s, ".1f", " GB/s"),
            "draft_share": _num(r.draft_time_share, ".0%") if not math.isnan(r.draft_time_share) else "–",
            "lossy": (not math.isnan(r.exact_match)) and r.exact_match < 1.0,
        })
    return rows


def build_report(run_dir: Path, out: Path | None = None) -> Path:
    manifest = read_manifest(run_dir)
    records = read_records(run_dir / RESULTS_FILE)
    frame = records_frame(records)
    weight_bytes = manifest.get("model", {}).get("weight_bytes")
    if frame.empty:
        summary = pd.DataFrame()
    else:
        per_task = summarize(frame, by=("task", "method"), weight_bytes=weight_bytes)
        overall = summarize(frame, by=("method",), weight_bytes=weight_bytes).assign(task="all")
        summary = pd.concat([per_task, overall], ignore_index=True) if per_task.task.nunique() > 1 else per_task
        summary = in_run_order(summary, manifest.get("config", {}).get("methods"))
    charts = {}
    if not summary.empty:
        by_task = summary[summary.task != "all"] if (summary.task == "all").any() else summary
        steps = pd.DataFrame([{"method": m, "accepted": a} for m, acc in zip(frame.method, frame.accepted)
                              for a in acc[1:]])  # skip the prefill step: it always commits one token
        charts = {
            "Speedup by task (geometric mean, 95% bootstrap interval)": plots.speedup_by_task(by_task),
            "Tokens accepted per step": plots.accepted_length_distribution(steps),
            "Acceptance rate by draft depth": plots.acceptance_by_depth(summary[summary.task == summary.task.iloc[-1]]),
            "Speedup against draft size": plots.speedup_vs_draft_size(by_task),
        }
    categories = {}
    if not frame.empty and frame.groupby("task").category.nunique().max() > 1:
        cat = in_run_order(summarize(frame, by=("task", "category", "method"), weight_bytes=weight_bytes),
                           manifest.get("config", {}).get("methods"))
        categories = [{"task": r.task, "category": r.category, "method": r.method,
                       "speedup": _num(r.speedup_geomean, ".2f", "x"), "mal": _num(r.mean_accepted_length, ".2f"),
                       "exact": _num(r.exact_match, ".0%")} for r in cat.itertuples()]
    divergences = []
    div_path = run_dir / DIVERGENCES_FILE
    if div_path.is_file():
        divergences = [json.loads(line) for line in div_path.read_text().splitlines() if line.strip()]
    firp_analysis = None
    if (run_dir / "firp_analysis.json").is_file():
        firp_analysis = json.loads((run_dir / "firp_analysis.json").read_text())
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "jinja"]))
    page = env.get_template("report.html.jinja").render(divergences=divergences, firp_analysis=firp_analysis,
        run_dir=str(run_dir), manifest=manifest, rows=summary_rows(summary) if not summary.empty else [],
        charts=charts, categories=categories, examples=drilldown(frame, records),
        skipped=sum(1 for r in records if r.get("skipped")),
        manifest_json=json.dumps(manifest, indent=2, ensure_ascii=False),
    )
    out = out or run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
