"""Seaborn charts rendered to inline SVG strings (text as paths: no fonts, no network)."""

from __future__ import annotations

import io
import re
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

plt.rcParams["svg.fonttype"] = "path"
sns.set_theme(style="whitegrid", context="notebook")


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and doctype: inline SVG needs neither
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)


def speedup_by_task(summary: pd.DataFrame) -> str:
    """Geometric-mean speedup per task and method, with bootstrap 95% intervals."""
    df = summary.copy()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    tasks = list(dict.fromkeys(df.task))
    methods = list(dict.fromkeys(df.method))
    width = 0.8 / max(1, len(methods))
    palette = sns.color_palette("deep", len(methods))
    for j, method in enumerate(methods):
        sub = df[df.method == method].set_index("task").reindex(tasks)
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
        vals = sub.speedup_geomean.fillna(0).tolist()
        lo = (sub.speedup_geomean - sub.speedup_ci_low).fillna(0).clip(lower=0).tolist()
        hi = (sub.speedup_ci_high - sub.speedup_geomean).fillna(0).clip(lower=0).tolist()
        ax.bar(xs, vals, width=width, label=method, color=palette[j], yerr=[lo, hi], capsize=3)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("speedup vs vanilla (geomean)")
    ax.legend(frameon=False, fontsize="small", ncols=min(4, len(methods)))
    return _svg(fig)


def accepted_length_distribution(steps: pd.DataFrame) -> str:
    """Tokens committed per target forward (bonus included), per method."""
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    if len(steps):
        share = (steps.groupby("method").accepted.value_counts(normalize=True).rename("share").reset_index())
        sns.barplot(share, x="accepted", y="share", hue="method", ax=ax)
    ax.set_xlabel("tokens accepted per step")
    ax.set_ylabel("share of steps")
    return _svg(fig)


def acceptance_by_depth(summary: pd.DataFrame) -> str:
    """P(draft token at depth d accepted | depth d-1 accepted), per method (methods that draft)."""
    rows = []
    for r in summary.itertuples():
        for d, rate in enumerate(r.acceptance_by_depth, start=1):
            if not math.isnan(rate):
                rows.append({"method": r.method, "depth": d, "rate": rate})
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    if rows:
        sns.lineplot(pd.DataFrame(rows), x="depth", y="rate", hue="method", marker="o", ax=ax)
    else:
        ax.text(0.5, 0.5, "no method drafted", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("acceptance rate")
    ax.set_xlabel("draft depth")
    return _svg(fig)


def speedup_vs_draft_size(summary: pd.DataFrame) -> str:
    """Each method x task: mean draft size against speedup (cheap drafts that still win sit top-left)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    sns.scatterplot(summary, x="draft_size", y="speedup_geomean", hue="method", style="task", s=80, ax=ax)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("draft tokens verified per step")
    ax.set_ylabel("speedup vs vanilla (geomean)")
    ax.legend(frameon=False, fontsize="small")
    return _svg(fig)
