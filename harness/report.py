"""``report`` and ``compare``: read run folders, compute the metrics, and have ``reports`` render them."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.checks import _identity, machine_of, run_metrics, settings_differ
from harness.claims import Claim, firp_claims
from harness.metrics import (BASELINE, CROSSOVER, choice_text, crossovers, first_divergence, guard_by_method,
                             in_run_order, load_frame, load_levels, lowest_level, records_frame, summarize)
from harness.results import read_manifest, read_run_divergences, read_run_records
from base.errors import UserError
from base.files import check_writable, write_text
from methods.core.hardware import machine_label
from methods.registry import UnknownMethodError, get_spec
from reports import plots
from reports.html import fmt, first_char_divergence, highlight, render_comparison, render_report

# metric -> True when higher is better
METRICS = {"speedup_geomean": True, "speedup_total": True, "mean_accepted_length": True, "draft_size": False, "exact_match": True,
           "rouge2": True, "tokens_per_s": True}



def method_sections(run_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each method in the run that has a report section contributes it (e.g. FIRP's analysis)."""
    names = {m.split("@")[0] for m in manifest.get("config", {}).get("methods", [])}
    sections = []
    for name in sorted(names):
        try:
            fn = get_spec(name).entry("report")
        except UnknownMethodError:  # a method registered by a package not imported now
            continue
        section = fn(run_dir) if fn else None
        if section:
            sections.append({"method": name, **section})
    return sections


def describe_data(training: dict[str, Any]) -> str:
    """The files, how many of their prompts, and the self-written ones: two runs on the same
    files but different prompt counts are different training sets, and the row must say so."""
    files = ", ".join(training.get("data") or [])
    if not files:
        return "-"
    extra = [f"first {training['prompts']} prompts"] if training.get("prompts") else []
    if training.get("self_prompts"):
        extra.append(f"+ {training['self_prompts']} self-written")
    if training.get("summary_prompts"):
        extra.append(f"+ {training['summary_prompts']} summary requests")
    if training.get("earlier"):  # the stages themselves are in the stopped column
        extra.append(f"trained in {len(training['earlier']) + 1} stages")
    elif training.get("init_from"):
        extra.append(f"continued from {training['init_from']}")
    return files + (f" ({'; '.join(extra)})" if extra else "")


def describe_stop(training: dict[str, Any]) -> str:
    """Why training ended, the step kept, the patience of the plateau rule and the step ceiling
    where one capped the budget: the same rule for every method shows as the same words. A file
    trained in stages (``--init-from``) says each earlier stage's stop after its own."""
    stop = _stage_stop(training, with_patience=True)
    for stage in reversed(training.get("earlier") or []):
        stop += f"; continued from a run of {stage.get('steps', '?')} steps that stopped: {_stage_stop(stage)}"
    return stop


def _stage_stop(stage: dict[str, Any], with_patience: bool = False) -> str:
    """One training stage's stop, best step, patience, rate cuts and step ceiling."""
    best = stage.get("best_step")
    stop = (f"{stage.get('stopped')} (best step {best}{', its start' if best == 0 else ''})" if best is not None
            else stage.get("stopped") or "-")
    stop += f", patience {stage['patience']}" if with_patience and stage.get("patience") and best is not None else ""
    if stage.get("schedule") == "plateau":  # the rate was held and cut at each stall, not decayed
        cuts = stage.get("lr_cuts") or []
        stop += (f"; lr held, cut {stage.get('lr_factor') or 0.3:g}x at step{'s' if len(cuts) > 1 else ''} "
                 f"{', '.join(map(str, cuts))}" if cuts else "; lr held, never cut")
    return stop + (f", at most {stage['max_steps']} steps" if stage.get("max_steps") else "")


def _per_stage(training: dict[str, Any], key: str) -> list[Any]:
    """A value (steps, rate, seconds) of every stage of a file's training, oldest first."""
    return [stage.get(key) for stage in training.get("earlier") or []] + [training.get(key)]


def training_rows(manifest: dict[str, Any], summary: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per trained method: its data, budget, stopping and validation, and for a
    cost-fitted tree the predicted speedup beside the measured one (principle 4: the report
    says what each method was trained on)."""
    overall = summary[summary.task == "all"] if not summary.empty and (summary.task == "all").any() else summary
    measured = (dict(zip(overall.method, overall.speedup_geomean))
                if not overall.empty and "speedup_geomean" in overall else {})
    rows = []
    for label, info in (manifest.get("methods") or {}).items():
        training, choice = info.get("training"), info.get("tree_choice")
        if not training and not choice:
            continue
        t = training or {}
        rows.append({
            "method": label,
            "data": describe_data(t),
            "sequences": t.get("sequences") if t.get("sequences") is not None else "-",
            "steps": " + ".join("?" if v is None else str(v) for v in _per_stage(t, "steps"))
                     if t.get("steps") is not None else "-",
            "lr": ", then ".join("?" if v is None else f"{v:g}" for v in _per_stage(t, "lr"))
                  if t.get("lr") is not None else "-",
            "stopped": describe_stop(t),
            "validation": (f"{t['val_best']:.3f} ({t.get('val_metric')})" if t.get("val_best") is not None else "-"),
            "minutes": (f"{sum(seconds) / 60:.1f}" if None not in (seconds := _per_stage(t, "train_time_s")) else "-"),
            "tree": (f"{choice['draft_size']} nodes, {choice['processed']} processed" if choice else
                     (str(info.get("draft_size", "-")))),
            "predicted": f"{choice['predicted_speedup']:.2f}x" if choice else "-",
            "measured": (f"{measured[label]:.2f}x" if label in measured and not pd.isna(measured[label]) else "-"),
        })
    return rows


def draft_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method whose manifest entry records its draft parameters (FIRP's claim is
    drafts far smaller than Medusa's: the reader sees each drafter's size beside the others)."""
    rows = []
    for label, info in (manifest.get("methods") or {}).items():
        size = info.get("draft_parameters")
        if isinstance(size, dict) and "parameters" in size:
            rows.append({"method": label, "drafter": info.get("drafter", "-"), "parameters": f"{int(size['parameters']):,}",
                         "bytes": f"{int(size.get('bytes') or 0) / 1e6:.1f} MB" if size.get("parameters") else "-"})
    return rows


def fitted_rows(manifest: dict[str, Any], summary: pd.DataFrame,
                guards: dict[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
    """One row per method that fitted its draft to the machine: whether it drafted or took plain
    steps, its best predicted speedup beside the measured one, why (``describe()``'s ``fitted``),
    and for a fit that drafts under a rate guard, how many of its steps the guard made plain
    (``guards``: ``guard_by_method`` over the records)."""
    guards = guards or {}
    overall = summary[summary.task == "all"] if not summary.empty and (summary.task == "all").any() else summary
    measured = (dict(zip(overall.method, overall.speedup_geomean))
                if not overall.empty and "speedup_geomean" in overall else {})
    return [{"method": label, "drafting": "drafts" if f["drafting"] else "plain steps",
             "predicted": f"{f['best_predicted_speedup']:.2f}x", "reason": f.get("reason", ""),
             "measured": (f"{measured[label]:.2f}x" if label in measured and not pd.isna(measured[label]) else "-"),
             "guard": guard_text(guards.get(label)) if (info or {}).get("guard") is not None else "-"}
            for label, info in (manifest.get("methods") or {}).items() if (f := (info or {}).get("fitted"))]


def guard_text(counts: dict[str, int] | None) -> str:
    """What a rate guard did over the run's timed generations, in a few words."""
    steps = (counts or {}).get("drafted_steps", 0) + (counts or {}).get("plain_steps", 0)
    if not counts or steps == 0:
        return "no steps"
    return (f"plain on {counts['plain_steps'] / steps:.0%} of {steps:,} steps; "
            f"{counts['drafted_steps']:,} drafted ({counts.get('probes', 0):,} of them probes)")


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
                outputs.append({"method": r["method"], "html": "<em>skipped: " + escape(r["skipped"]) + "</em>",
                                "steps": "", "status": "skipped"})
                continue
            text = "\n\n".join(t["text"] for t in r["turns"])
            ids = [x for t in r["turns"] for x in t["tokens"]]
            token_div = first_divergence(ids, base_ids) if base_ids is not None and r["method"] != BASELINE else None
            char_div = first_char_divergence(text, base_text) if token_div is not None else None
            accepted = [a for t in r["turns"] for a in t["accepted"]]
            length = f"{r['new_tokens']} tokens" + (
                f" (vanilla {len(base_ids)})" if base_ids is not None and r["method"] != BASELINE
                and len(base_ids) != r["new_tokens"] else "")
            outputs.append({
                "length": length,
                "method": r["method"],
                "html": highlight(text, char_div),
                "steps": " ".join(str(a) for a in accepted),
                "status": "identical to vanilla" if token_div is None and r["method"] != BASELINE else (
                    f"diverges at token {token_div}" if token_div is not None else "baseline"),
                "time": f"{r['wall_time']:.2f} s",
                "tokens": r["new_tokens"],
            })
        items.append({"task": task, "example_id": example_id, "category": recs[0].get("category"),
                      "diverged": any("diverges" in o["status"] for o in outputs), "outputs": outputs})
    return items


def category_pivot(cat: pd.DataFrame, methods: list[str]) -> dict[str, Any]:
    """Categories x methods (Spec-Bench's headline layout): per cell the speedup and mean accepted length."""
    shown = [m for m in methods if m in set(cat.method) and m != BASELINE]  # vanilla is 1.00x by definition
    shown = shown or [BASELINE]
    cells = {(r.task, r.category, r.method): r for r in cat.itertuples()}
    rows = []
    for task, category in dict.fromkeys(zip(cat.task, cat.category)):
        row = []
        for m in shown:
            r = cells.get((task, category, m))
            row.append({"speedup": fmt(r.speedup_geomean, ".2f", "x") if r is not None else "–",
                        "mal": fmt(r.mean_accepted_length, ".2f") if r is not None else "–",
                        "examples": r.examples if r is not None else 0})
        rows.append({"task": task, "category": category, "cells": row})
    return {"methods": shown, "rows": rows, "several_tasks": cat.task.nunique() > 1}


def divergence_summary(divergences: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: divergences from vanilla, how many the float32 reference explains as numerics, how many
    are real, and how many are only a length difference (one output a prefix of the other)."""
    out = []
    for m in [*methods, *sorted({d["method"] for d in divergences} - set(methods))]:
        mine = [d for d in divergences if d["method"] == m]
        if m == BASELINE:
            continue
        out.append({"method": m, "divergences": len(mine),
                    "numerics": sum(1 for d in mine if verdict(d) == "numerics"),
                    "real": sum(1 for d in mine if verdict(d) == "real"),
                    "length": sum(1 for d in mine if verdict(d) == "length")})
    return out


def verdict(d: dict[str, Any]) -> str:
    """``numerics``, ``real`` or ``length``; older files carry only ``near_tie``."""
    if "verdict" in d:
        return d["verdict"]
    if d.get("note") == "length differs":
        return "length"
    return "numerics" if d.get("near_tie") else "real"


def verdict_text(d: dict[str, Any]) -> str:
    kind = verdict(d)
    if kind == "length":
        return "length only (one output is a prefix of the other)"
    if kind == "numerics":
        return "numerics (float32 gap within twice the low-precision error)" if d.get("error") is not None else "numerics"
    return "REAL DISCREPANCY"


def headline(summary: pd.DataFrame, verdicts: list[dict[str, Any]]) -> str:
    """The one-line answer the report opens with: the fastest method, its interval, and real divergences."""
    real = sum(v["real"] for v in verdicts)
    tail = f"{real} real divergence{'s' if real != 1 else ''} from vanilla"
    if summary.empty:
        return "no completed generations yet"
    overall = summary
    if "task" in summary:  # several tasks: the "all" row answers for the whole run
        overall = summary[summary.task == "all"] if (summary.task == "all").any() else summary
        overall = overall[overall.task == overall.task.iloc[0]]
    contenders = overall[(overall.method != BASELINE) & overall.speedup_geomean.notna()]
    if contenders.empty:
        return f"vanilla only: no method to compare (name some with --methods); {tail}"
    best = contenders.loc[contenders.speedup_geomean.idxmax()]
    excluded = best.get("speedup_excluded", 0)
    paired = int(best.examples - (0 if pd.isna(excluded) else excluded))  # examples the speedup is over
    figures = (f"{best.speedup_geomean:.2f}x [{fmt(best.speedup_ci_low, '.2f')}, {fmt(best.speedup_ci_high, '.2f')}] "
               f"over {paired} example{'s' if paired != 1 else ''}")
    if best.speedup_geomean < 1:  # never call a slowdown "fastest"
        return f"fastest: vanilla; no method beats it here (best: {best.method} {figures}); {tail}"
    return f"fastest: {best.method} {figures}; {tail}"


def baseline_step_ms(records: list[dict[str, Any]]) -> float | None:
    """Vanilla's median decode step in ms: every turn's per-step times but its first (the
    prefill, which processes the whole prompt); None where no record has step times."""
    steps = [x for r in records if r.get("method") == BASELINE and not r.get("skipped")
             for t in r.get("turns") or [] for x in (t.get("step_times") or [])[1:]]
    return 1000 * float(np.median(steps)) if steps else None


def hardware_summary(manifest: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The machine's label and the baseline's decode step held against the bandwidth limit
    (``manifest.decode_limit``): how much faster vanilla could go on this machine, which bounds
    how much of a method's speedup is a slow baseline."""
    env = manifest.get("environment") or {}
    limit = manifest.get("decode_limit") or {}
    summary: dict[str, Any] = {"label": machine_label(machine_of(manifest)),
                               "bandwidth_gbs": env.get("read_bandwidth_gbs"), "roofline": None,
                               "context": limit.get("context"), "context_rule": limit.get("context_rule")}
    step = baseline_step_ms(records)
    if step and limit.get("step_limit_ms") and limit.get("read_bandwidth_gbs") and limit.get("step_bytes"):
        summary["roofline"] = (f"{BASELINE}: {step:.1f} ms a step, limit {limit['step_limit_ms']:.1f} ms (bandwidth "
                               f"{limit['read_bandwidth_gbs']:.1f} GB/s × {limit['step_bytes'] / 1e6:.0f} MB): "
                               f"{limit['step_limit_ms'] / step:.0%} of the limit")
    return summary


def claim_rows(summary: pd.DataFrame, methods: list[str],
               verdicts: list[dict[str, Any]] | None = None) -> list[Claim]:
    """The FIRP paper's claims against this run's whole-run metrics (the "all" row of a run of
    several tasks) and its divergence verdicts: empty unless FIRP ran beside another method."""
    if summary.empty:
        return []
    overall = summary[summary.task == "all"] if (summary.task == "all").any() else summary
    overall = overall[overall.task == overall.task.iloc[0]]
    return firp_claims({r["method"]: r for r in overall.to_dict("records")}, methods,
                       {v["method"]: v for v in verdicts or []})


def load_section(records: list[dict[str, Any]], methods: list[str], colors: dict[str, str]) -> dict[str, Any] | None:
    """The "Under load" section of a run of more than one concurrency level: per method and level
    the table behind two charts, speedup against concurrency (each method's crossover under
    ``CROSSOVER`` marked) and throughput against median time per output token. None for a run
    without load or of one level (the other sections already say all of one level)."""
    levels = load_levels(records)
    if len(levels) < 2:
        return None
    frame = load_frame(records)
    if frame.empty:
        return None
    order = {m: i for i, m in enumerate([*methods, *frame.method])}
    frame = frame.assign(_m=frame.method.map(order)).sort_values(["_m", "concurrency"], kind="stable")
    frame = frame.drop(columns="_m").reset_index(drop=True)
    frame["choice_text"] = frame.choice.map(choice_text)
    crossover = crossovers(frame)
    return {
        "frame": frame, "crossover": crossover, "threshold": CROSSOVER, "levels": levels, "lowest": levels[0],
        "falls": [{"method": m, "level": level} for m, level in crossover.items()],
        "charts": {
            "Speedup against concurrency (ring: where it first falls under "
            f"{CROSSOVER:.2f}x)": plots.speedup_vs_concurrency(frame, crossover, colors, CROSSOVER),
            "Throughput against time per output token (labels: concurrency)": plots.throughput_vs_tpot(frame, colors),
        },
    }


def build_report(run_dir: Path, out: Path | None = None) -> Path:
    if out is not None:
        check_writable(out, "-o")
    manifest = read_manifest(run_dir)
    every = read_run_records(run_dir)
    records = lowest_level(every)  # what every section but "Under load" reads
    frame = records_frame(records)
    weight_bytes = manifest.get("model", {}).get("weight_bytes")
    if frame.empty:
        summary = pd.DataFrame()
    else:
        per_task = summarize(frame, by=("task", "method"), weight_bytes=weight_bytes)
        overall = summarize(frame, by=("method",), weight_bytes=weight_bytes).assign(task="all")
        summary = pd.concat([per_task, overall], ignore_index=True) if per_task.task.nunique() > 1 else per_task
        summary = in_run_order(summary, manifest.get("config", {}).get("methods"))
    methods = list(dict.fromkeys([*(manifest.get("config", {}).get("methods") or []),
                                  *(summary.method if not summary.empty else [])]))
    colors = plots.method_colors(methods)
    charts = {}
    categories: dict[str, Any] = {}
    if not summary.empty:
        by_task = summary[summary.task != "all"] if (summary.task == "all").any() else summary
        steps = pd.DataFrame([{"method": m, "accepted": a} for m, acc in zip(frame.method, frame.accepted)
                              for a in acc[1:]])  # skip the prefill step: it always commits one token
        charts = {
            "Speedup by task (geometric mean, 95% bootstrap interval)": plots.speedup_by_task(by_task, colors),
            "Tokens accepted per step": plots.accepted_length_distribution(steps, colors),
            "Acceptance by draft position": plots.acceptance_by_position(
                summary[summary.task == summary.task.iloc[-1]], colors),
            "Speedup against tokens processed per step": plots.speedup_vs_cost(by_task, colors),
        }
        if frame.groupby("task").category.nunique().max() > 1:
            cat = in_run_order(summarize(frame, by=("task", "category", "method"), weight_bytes=weight_bytes),
                               methods)
            categories = category_pivot(cat, methods)
            charts["Speedup by category (geometric mean, 95% bootstrap interval)"] = plots.speedup_by_category(
                cat, colors)
    divergences = read_run_divergences(run_dir)
    verdicts = divergence_summary(divergences, methods)
    divergences = [{**d, "verdict_text": verdict_text(d)} for d in divergences]
    page = render_report(run_dir=str(run_dir), manifest=manifest, summary=summary, charts=charts,
                         categories=categories, divergences=divergences, verdicts=verdicts, colors=colors,
                         headline=headline(summary, verdicts), examples=drilldown(frame, records),
                         method_sections=method_sections(run_dir, manifest),
                         training=training_rows(manifest, summary), fitted=fitted_rows(manifest, summary, guard_by_method(records)),
                         drafters=draft_rows(manifest), claims=claim_rows(summary, methods, verdicts),
                         hardware=hardware_summary(manifest, records),
                         load=load_section(every, methods, colors),
                         skipped=sum(1 for r in records if r.get("skipped")))
    return write_text(out or run_dir / "report.html", page, "-o")


def build_comparison(run_a: Path, run_b: Path, out: Path, *, force: bool = False, rel_tol: float = 0.02) -> Path:
    check_writable(out, "-o")
    man_a, rows_a = run_metrics(run_a)
    man_b, rows_b = run_metrics(run_b)
    id_a, id_b = _identity(man_a), _identity(man_b)
    if not force:
        if id_a["model"] != id_b["model"]:
            raise UserError(f"the runs used different models ({id_a['model']} vs {id_b['model']}); pass --force")
        if id_a["task_hashes"] != id_b["task_hashes"]:
            raise UserError("the runs used different examples (task hashes differ); pass --force to compare anyway")
        differ = settings_differ(id_a, id_b)
        if differ:
            raise UserError(f"the runs used different settings ({'; '.join(differ)}); pass --force to compare anyway")
    b_index = {(r["method"], r["task"]): r for r in rows_b}
    rows = []
    for ra in rows_a:
        rb = b_index.get((ra["method"], ra["task"]))
        if rb is None:
            continue
        cells = []
        for metric, higher_better in METRICS.items():
            a, b = ra.get(metric), rb.get(metric)
            bad = good = False
            if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)) and a != 0:
                change = (b - a) / abs(a)
                worse = change < -rel_tol if higher_better else change > rel_tol
                better = change > rel_tol if higher_better else change < -rel_tol
                bad, good = worse, better
            cells.append({"metric": metric, "a": a, "b": b, "bad": bad, "good": good})
        rows.append({"method": ra["method"], "task": ra["task"], "cells": cells})
    page = render_comparison(run_a=str(run_a), run_b=str(run_b), rows=rows, metrics=list(METRICS), rel_tol=rel_tol)
    return write_text(out, page, "-o")
