"""Seaborn charts rendered to inline SVG strings (text as paths: no fonts, no network).

Every chart takes the same ``colors`` mapping (method label -> colour, from ``method_colors``),
so a method keeps its colour from chart to chart and vanilla is always the same grey. Each
legend entry is tagged with an SVG id ``<chart>-legend-<method>``, which lets a browser test
read the colour a method was drawn in without parsing text rendered as paths.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

plt.rcParams["svg.fonttype"] = "path"
sns.set_theme(style="whitegrid", context="notebook")

BASELINE = "vanilla"
BASELINE_COLOR = "#8c8c8c"  # seaborn "deep" grey: the baseline is the reference, not a contender


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method label, in run order; vanilla always grey, the others from "deep" (grey skipped)."""
    deep = [to_hex(c) for c in sns.color_palette("deep", 10)]
    others = [c for c in deep if c != BASELINE_COLOR]
    colors: dict[str, str] = {}
    i = 0
    for method in dict.fromkeys(methods):
        if method == BASELINE:
            colors[method] = BASELINE_COLOR
        else:
            colors[method] = others[i % len(others)]
            i += 1
    return colors


def slug(text: str) -> str:
    """An SVG-id-safe form of a method label (variants carry '@', '=', '/')."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def figure_svg(fig) -> str:
    """Inline SVG of a matplotlib figure (closed after), so a report stays one self-contained file."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and doctype: inline SVG needs neither
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)


def _legend(ax: Axes, chart: str, colors: dict[str, str], **kwargs) -> None:
    """A legend only when something is labelled (else matplotlib logs a warning), entries tagged by method."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        return
    legend = ax.legend(handles, labels, frameon=False, fontsize="small", **kwargs)
    for handle, label in zip(legend.legend_handles, labels):
        if label in colors and handle is not None:
            handle.set_gid(f"{chart}-legend-{slug(label)}")


def _no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)


def _grouped_speedup_bars(df: pd.DataFrame, group: str, colors: dict[str, str], chart: str,
                          xlabel: str | None = None) -> str:
    """Bars of geometric-mean speedup per ``group`` value and method, with bootstrap 95% intervals."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    df = df[df.method != BASELINE]  # vanilla is the 1.0 line, not a bar
    groups = list(dict.fromkeys(df[group]))
    methods = list(dict.fromkeys(df.method))
    width = 0.8 / max(1, len(methods))
    drawn = False
    for j, method in enumerate(methods):
        sub = df[df.method == method].drop_duplicates(group).set_index(group).reindex(groups)
        if sub.speedup_geomean.isna().all():
            continue
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        vals = sub.speedup_geomean.fillna(0).tolist()
        lo = (sub.speedup_geomean - sub.speedup_ci_low).fillna(0).clip(lower=0).tolist()
        hi = (sub.speedup_ci_high - sub.speedup_geomean).fillna(0).clip(lower=0).tolist()
        bars = ax.bar(xs, vals, width=width, label=method, color=colors.get(method), yerr=[lo, hi], capsize=3)
        for k, bar in enumerate(bars.patches):
            bar.set_gid(f"{chart}-series-{slug(method)}-{k}")
        drawn = True
    ax.axhline(1.0, color=colors.get(BASELINE, BASELINE_COLOR), linewidth=1.0, linestyle="--")
    if groups:
        ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0,
                      ha="right" if len(groups) > 4 else "center")
    if not drawn:
        _no_data(ax, "no speedup to show (vanilla alone)")
    ax.set_ylabel("speedup vs vanilla (geomean)")
    if xlabel:
        ax.set_xlabel(xlabel)
    _legend(ax, chart, colors, ncols=min(4, max(1, len(methods))))
    return figure_svg(fig)


def speedup_by_task(summary: pd.DataFrame, colors: dict[str, str]) -> str:
    """Geometric-mean speedup per task and method; vanilla is the dashed 1.0 line."""
    return _grouped_speedup_bars(summary, "task", colors, "speedup-by-task")


def speedup_by_category(summary: pd.DataFrame, colors: dict[str, str]) -> str:
    """Per category (task:category when several tasks), the same bars: where each method pays off."""
    df = summary.copy()
    if df.task.nunique() > 1:
        df["category"] = df.task.astype(str) + ":" + df.category.astype(str)
    return _grouped_speedup_bars(df, "category", colors, "speedup-by-category")


def accepted_length_distribution(steps: pd.DataFrame, colors: dict[str, str]) -> str:
    """Tokens committed per target forward (bonus included), per method."""
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    if len(steps):
        share = (steps.groupby("method", sort=False).accepted.value_counts(normalize=True)
                 .rename("share").reset_index())
        order = [m for m in colors if m in set(share.method)]
        sns.barplot(share, x="accepted", y="share", hue="method", hue_order=order, palette=colors,
                    saturation=1.0, ax=ax)  # seaborn desaturates bars by default: keep the palette's colour
    else:
        _no_data(ax, "no decoding steps")
    ax.set_xlabel("tokens accepted per step")
    ax.set_ylabel("share of steps")
    _legend(ax, "accepted-length", colors)
    return figure_svg(fig)


def acceptance_by_position(summary: pd.DataFrame, colors: dict[str, str]) -> str:
    """Per method that drafts: of the steps whose draft reached position k, the share that accepted
    it there. A falling line is where a drafter's guesses stop being right; its length is how deep
    the method drafts."""
    rows = [{"method": r.method, "position": k, "rate": rate}
            for r in summary.itertuples() if r.method != BASELINE
            for k, rate in enumerate(r.acceptance_by_position or [], start=1)]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    if rows:
        df = pd.DataFrame(rows)
        order = [m for m in colors if m in set(df.method)]
        sns.lineplot(df, x="position", y="rate", hue="method", hue_order=order, palette=colors, marker="o", ax=ax)
    else:
        _no_data(ax, "no method drafted (or the records predate per-step draft depths)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # positions are whole numbers
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("acceptance rate")
    ax.set_xlabel("draft position")
    _legend(ax, "acceptance-position", colors)
    return figure_svg(fig)


def speedup_vs_cost(summary: pd.DataFrame, colors: dict[str, str]) -> str:
    """Each method x task: tokens processed per step (a step's real cost) against speedup.

    Processed, not drafted: Lookahead's Jacobi window and FIRP's pseudo tokens cost compute
    without being drafts, so the draft size alone would flatter them. Cheap steps that still
    win sit top-left.
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    df = summary.dropna(subset=["processed_per_step", "speedup_geomean"])
    df = df[df.method != BASELINE]
    if len(df):
        order = [m for m in colors if m in set(df.method)]
        style = "task" if df.task.nunique() > 1 else None
        sns.scatterplot(df, x="processed_per_step", y="speedup_geomean", hue="method", hue_order=order,
                        palette=colors, style=style, s=80, ax=ax)
    else:
        _no_data(ax, "no speedup to show (vanilla alone)")
    ax.axhline(1.0, color=colors.get(BASELINE, BASELINE_COLOR), linewidth=1.0, linestyle="--")
    ax.set_xlabel("tokens processed per step (beyond the committed one)")
    ax.set_ylabel("speedup vs vanilla (geomean)")
    _legend(ax, "speedup-cost", colors)
    return figure_svg(fig)


def speedup_vs_concurrency(load: pd.DataFrame, crossover: dict[str, int | None], colors: dict[str, str],
                           threshold: float) -> str:
    """Per method, its throughput over vanilla's at each concurrency level; a ring marks the level
    where it first falls under ``threshold`` (where speculation stops paying), and the dotted
    line is that threshold."""
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    df = load[load.method != BASELINE].dropna(subset=["speedup"])
    if len(df):
        for method, sub in df.groupby("method", sort=False):
            line, = ax.plot(sub.concurrency, sub.speedup, marker="o", color=colors.get(method), label=method)
            line.set_gid(f"speedup-concurrency-series-{slug(method)}")
            level = crossover.get(method)
            if level is not None:
                at = sub[sub.concurrency == level].speedup.iloc[0]
                ring = ax.scatter([level], [at], s=220, facecolors="none", edgecolors=colors.get(method), linewidths=2)
                ring.set_gid(f"speedup-concurrency-crossover-{slug(method)}")
    else:
        _no_data(ax, "no speedup to show (vanilla alone)")
    ax.axhline(1.0, color=colors.get(BASELINE, BASELINE_COLOR), linewidth=1.0, linestyle="--")
    ax.axhline(threshold, color=colors.get(BASELINE, BASELINE_COLOR), linewidth=0.8, linestyle=":")
    levels = sorted(set(load.concurrency))
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(level) for level in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("speedup vs vanilla (throughput)")
    _legend(ax, "speedup-concurrency", colors)
    return figure_svg(fig)


def throughput_vs_tpot(load: pd.DataFrame, colors: dict[str, str]) -> str:
    """The latency-throughput curve: per method, each level's output tokens per second against its
    median time per output token, the points joined in level order and labelled with the level.
    Further up is more work done, further left is faster for each request."""
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    df = load.dropna(subset=["throughput", "tpot_p50"])
    if len(df):
        for method, sub in df.groupby("method", sort=False):
            line, = ax.plot(1000 * sub.tpot_p50, sub.throughput, marker="o", color=colors.get(method), label=method)
            line.set_gid(f"throughput-tpot-series-{slug(method)}")
            for x, y, level in zip(1000 * sub.tpot_p50, sub.throughput, sub.concurrency):
                ax.annotate(str(level), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    else:
        _no_data(ax, "no load levels")
    ax.set_xlabel("median time per output token (ms)")
    ax.set_ylabel("output tokens / s")
    _legend(ax, "throughput-tpot", colors)
    return figure_svg(fig)
