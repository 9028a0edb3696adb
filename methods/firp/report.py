"""FIRP's section of a run's report: the analysis written by ``harness analyze firp --out RUN_DIR/firp_analysis.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from methods.core.errors import UserError

ANALYSIS_FILE = "firp_analysis.json"


def section(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        return None
    try:
        analysis = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); rerun `harness analyze firp` or delete it") from None
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html", "jinja"]))
    html = env.get_template("report.html.jinja").render(firp_analysis=analysis)
    return {"title": "FIRP analysis", "html": html}
