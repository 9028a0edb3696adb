"""Our own CI gate: a small deterministic suite (default model, CPU, float32, every method with
its shipped defaults) checked against the baseline committed in ``tests/baselines``.

The run replays the baseline's measured costs (``--costs-from``), so ``auto`` trees and the
cost policies choose as they did on the machine that wrote the baseline, whatever CPU runs
the gate. Token ids, counters and choices must then match exactly. Speed is compared only
when the gate runs on the baseline's own kind of machine, and here with a 25% margin: CI runs
on a fresh virtual machine whose neighbours and memory are not the baseline machine's, even
when its CPU model is (a planted slowdown against a baseline from the same machine is
``tests/test_gate.py``'s job).

Refresh the baseline deliberately (after an intended change), then commit it. To keep the
costs (only the code's effect shows in the diff), replay them while refreshing:

    python -m harness run --methods vanilla,medusa,firp,eagle,sps,pld,lookahead,self_spec --tasks builtin \
        --limit 6 --max-new-tokens 24 --dtype float32 --device cpu \
        --costs-from tests/baselines/smollm2-135m-cpu-float32.json --out runs/ci --overwrite
    python -m harness baseline runs/ci -o tests/baselines/smollm2-135m-cpu-float32.json

(without ``--costs-from``, the run measures this machine's costs and the baseline keeps those).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main

pytestmark = pytest.mark.slow
BASELINE = Path(__file__).parent / "baselines" / "smollm2-135m-cpu-float32.json"
METHODS = "vanilla,medusa,firp,eagle,sps,pld,lookahead,self_spec"
RUN = ["run", "--methods", METHODS, "--tasks", "builtin", "--limit", "6", "--max-new-tokens", "24",
       "--dtype", "float32", "--device", "cpu", "--costs-from", str(BASELINE)]


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ci") / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    return out


def test_ci_suite_matches_committed_baseline(ci_run, capsys):
    capsys.readouterr()
    code = main(["check", str(ci_run), "--baseline", str(BASELINE), "--speed-margin", "0.25"])
    report = capsys.readouterr().out
    assert code == 0, report
    assert "all" in report and "checks passed" in report
    assert "counters and choices not compared" not in report  # the replay held: every counter was read
    for metric in ("token ids as in baseline", "syncs_per_step", "choice at setup"):
        assert metric in report


def test_the_gate_runs_the_shipped_defaults(ci_run):
    """No tree, policy or draft size pinned: what users run is what the gate guards."""
    assert not any(arg == "--method-option" for arg in RUN)
    manifest = json.loads((ci_run / "manifest.json").read_text())
    assert manifest["method_options"]["medusa"]["tree"] == "auto" and manifest["method_options"]["pld"]["policy"] == "cost"


def test_check_fails_on_lowered_acceptance(ci_run, tmp_path, capsys):
    """The gate really bites: a baseline demanding more than the run delivers fails with exit 1."""
    data = json.loads(BASELINE.read_text())
    for entry in data["entries"]:
        entry["mean_accepted_length"] += 0.5
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps(data))
    assert main(["check", str(ci_run), "--baseline", str(strict)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
