"""FIRP's section of a run's report: the analysis written by ``harness analyze firp --out RUN_DIR/firp_analysis.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from methods.core.files import read_json

ANALYSIS_FILE = "firp_analysis.json"


def cosine_chart(analysis: dict[str, Any]) -> str:
    """Cosine by layer, one line per step: where a pseudo state becomes (or stops becoming) the real one."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from reports.plots import figure_svg

    names = [n for n in ("maps", "compare") if analysis.get(n)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.8), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        a = analysis[name]
        for k, (step, cos) in enumerate(a["cosine_by_layer"].items()):
            labels = list(cos)
            ax.plot(range(len(labels)), list(cos.values()), marker="o", ms=3, color=sns.color_palette("deep")[k],
                    label=f"{step} (top-1 {a['accuracy'][step]['top1'] * 100:.0f}%)")
        ticks = [i for i in range(len(labels)) if i % 4 == 0 or i == len(labels) - 1]
        ax.set_xticks(ticks, [labels[i] for i in ticks])
        ax.set_xlabel("entering layer")
        ax.set_title(f"{a['config'].get('mode', '')} maps at {a['config'].get('layers')}", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("cosine to the real state")
    return figure_svg(fig)


def sweep_chart(sweep: dict[str, Any]) -> str:
    """Accepted length, step cost and their ratio by prediction layer: the seed paper's layer sweep."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from reports.plots import figure_svg

    rows = sorted(sweep["rows"], key=lambda r: r["layer"])
    layers = [r["layer"] for r in rows]
    colors = sns.color_palette("deep")
    fig, axes = plt.subplots(3, 1, figsize=(4.6, 4.8), sharex=True)
    for ax, key, label, color in zip(axes, ("val_accepted_length", "step_cost", "predicted_speedup"),
                                     ("accepted length\n(teacher-forced)", "step cost\n(x vanilla)",
                                      "predicted\nspeedup"), colors):
        ax.plot(layers, [r[key] for r in rows], marker="o", color=color)
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xticks(layers)
    axes[-1].set_xlabel("prediction layer")
    best = max(rows, key=lambda r: r["predicted_speedup"])
    axes[2].annotate(f"{best['predicted_speedup']:.2f}x", (best["layer"], best["predicted_speedup"]),
                     textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8)
    fig.tight_layout()
    return figure_svg(fig)


def section(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        return None
    analysis = read_json(path, "rerun `harness analyze firp` or delete it")
    charts = {}
    if any(analysis.get(n) for n in ("maps", "compare")):
        charts["cosine"] = cosine_chart(analysis)
    if (analysis.get("layer_sweep") or {}).get("rows"):
        charts["sweep"] = sweep_chart(analysis["layer_sweep"])
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html", "jinja"]))
    html = env.get_template("report.html.jinja").render(firp_analysis=analysis, charts=charts)
    return {"title": "FIRP analysis", "html": html}
