"""``python -m harness run`` end to end on the real default model, including resume."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.results import read_records

pytestmark = pytest.mark.slow
ARGS = ["run", "--limit", "2", "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu", "--warmup", "0"]


def test_run_writes_results_manifest_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "Summary" in stdout and "vanilla" in stdout
    records = read_records(out / "results.jsonl")
    assert len(records) == 2
    for r in records:
        assert r["method"] == "vanilla" and r["task"] == "builtin"
        turn = r["turns"][0]
        assert 0 < len(turn["tokens"]) <= 8 and turn["wall_time"] > 0
        assert turn["accepted"] == [1] * len(turn["tokens"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    env = manifest["environment"]
    for key in ("cpu", "torch_threads", "versions", "git", "device"):
        assert key in env
    assert env["versions"]["torch"] and env["versions"]["transformers"]
    assert manifest["dtype"] == "float32"
    assert len(manifest["tasks"]["builtin"]["hash"]) == 16

    # rerunning the same command skips what is done
    assert main([*ARGS, "--out", str(out)]) == 0
    assert len(read_records(out / "results.jsonl")) == 2


def test_truncated_last_line_is_repaired_and_rerun(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    path = out / "results.jsonl"
    full = read_records(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # a crash mid-write of the last record
    assert main([*ARGS, "--out", str(out)]) == 0
    assert "truncated" in capsys.readouterr().err
    again = read_records(path)
    assert [(r["example_id"], r["turns"][0]["tokens"]) for r in again] == [
        (r["example_id"], r["turns"][0]["tokens"]) for r in full
    ]
