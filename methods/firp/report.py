"""FIRP's section of a run's report: the analysis written by ``harness analyze firp --out RUN_DIR/firp_analysis.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from methods.core.files import read_json

ANALYSIS_FILE = "firp_analysis.json"


def section(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        return None
    analysis = read_json(path, "rerun `harness analyze firp` or delete it")
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html", "jinja"]))
    html = env.get_template("report.html.jinja").render(firp_analysis=analysis)
    return {"title": "FIRP analysis", "html": html}
