"""``python -m harness compare RUN_A RUN_B``: the metrics of two runs side by side, as HTML,
with regressions of B against A highlighted. Runs of different models or examples are
refused unless ``--force``: their numbers are not comparable."""

from __future__ import annotations

import math
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from harness.checks import _identity, run_metrics
from harness.errors import UserError
from reports.html import TEMPLATES

# metric -> True when higher is better
METRICS = {"speedup_geomean": True, "speedup_total": True, "mean_accepted_length": True, "draft_size": False, "exact_match": True,
           "rouge2": True, "tokens_per_s": True}


def build_comparison(run_a: Path, run_b: Path, out: Path, *, force: bool = False, rel_tol: float = 0.02) -> Path:
    man_a, rows_a = run_metrics(run_a)
    man_b, rows_b = run_metrics(run_b)
    id_a, id_b = _identity(man_a), _identity(man_b)
    if not force:
        if id_a["model"] != id_b["model"]:
            raise UserError(f"the runs used different models ({id_a['model']} vs {id_b['model']}); pass --force")
        if id_a["task_hashes"] != id_b["task_hashes"]:
            raise UserError("the runs used different examples (task hashes differ); pass --force to compare anyway")
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
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "jinja"]))
    page = env.get_template("compare.html.jinja").render(run_a=str(run_a), run_b=str(run_b), rows=rows,
                                                         metrics=list(METRICS), rel_tol=rel_tol)
    out.write_text(page, encoding="utf-8")
    return out
