"""Our own CI gate: a small deterministic suite (default model, CPU, float32, every method)
checked against the baseline committed in ``tests/baselines``. A change that lowers any
method's acceptance, exact match or Rouge-2 fails here.

Refresh the baseline deliberately (after an intended change), then commit it:

    python -m harness run --methods vanilla,medusa,firp,eagle,sps,pld,lookahead,self_spec --tasks builtin --limit 6 \
        --max-new-tokens 24 --dtype float32 --device cpu --method-option medusa.tree=trained \
        --method-option firp.tree=trained --method-option self_spec.policy=always --method-option pld.policy=fixed \
        --method-option eagle.total=16 --method-option sps.gamma=4 --method-option lookahead.tuned=none \
        --method-option lookahead.window=1 --method-option lookahead.ngram=2 --method-option lookahead.guesses=2 \
        --out runs/ci --overwrite
    python -m harness baseline runs/ci -o tests/baselines/smollm2-135m-cpu-float32.json
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main

pytestmark = pytest.mark.slow
BASELINE = Path(__file__).parent / "baselines" / "smollm2-135m-cpu-float32.json"
METHODS = "vanilla,medusa,firp,eagle,sps,pld,lookahead,self_spec"
# every draft size pinned (trained trees, self_spec drafting every step, PLD's length, EAGLE's 16 nodes, SpS's γ 4,
# Lookahead's 1x2x2 shape): fitted drafts follow the machine's measured costs, which would make the gate depend
# on the CI machine's CPU
RUN = ["run", "--methods", METHODS, "--tasks", "builtin", "--limit", "6", "--max-new-tokens", "24",
       "--dtype", "float32", "--device", "cpu", "--method-option", "medusa.tree=trained",
       "--method-option", "firp.tree=trained", "--method-option", "self_spec.policy=always",
       "--method-option", "pld.policy=fixed", "--method-option", "eagle.total=16", "--method-option", "sps.gamma=4",
       "--method-option", "lookahead.tuned=none", "--method-option", "lookahead.window=1",
       "--method-option", "lookahead.ngram=2", "--method-option", "lookahead.guesses=2"]


def test_ci_suite_matches_committed_baseline(tmp_path, capsys):
    out = tmp_path / "ci"
    assert main([*RUN, "--out", str(out)]) == 0
    code = main(["check", str(out), "--baseline", str(BASELINE)])
    report = capsys.readouterr().out
    assert code == 0, report
    assert "all" in report and "checks passed" in report


def test_check_fails_on_lowered_acceptance(tmp_path, capsys):
    """The gate really bites: a baseline demanding more than the run delivers fails with exit 1."""
    import json

    out = tmp_path / "ci"
    assert main([*RUN, "--out", str(out)]) == 0
    data = json.loads(BASELINE.read_text())
    for entry in data["entries"]:
        entry["mean_accepted_length"] += 0.5
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps(data))
    assert main(["check", str(out), "--baseline", str(strict)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
