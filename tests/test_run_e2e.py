"""``python -m harness run`` end to end on the real default model, including resume."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.results import read_records

pytestmark = pytest.mark.slow
ARGS = ["run", "--methods", "vanilla", "--limit", "2", "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu", "--warmup", "0"]


def test_run_writes_results_manifest_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "Summary" in stdout and "vanilla" in stdout
    # every phase says what it does on stderr: loading, method set-up (cost measurement), decoding,
    # divergence verdicts, report
    for phase in ("loading ", "setting up methods", "decoding", "divergence verdicts", "writing the report"):
        assert phase in captured.err, phase
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
    assert env["machine"]["kind"] == "cpu" and env["machine"]["threads"] == env["torch_threads"]
    assert env["read_bandwidth_gbs"] > 0
    # the tied embedding table is read once, as the head: a step reads every weight
    assert manifest["model"]["step_weight_bytes"] == manifest["model"]["weight_bytes"]
    limit = manifest["decode_limit"]
    prompts = sorted(r["turns"][0]["prompt_tokens"] for r in records)
    assert limit["context"] == (prompts[0] + prompts[1]) // 2 + 8 // 2
    assert limit["step_bytes"] == manifest["model"]["step_weight_bytes"] + \
        manifest["model"]["kv_bytes_per_token"] * limit["context"]
    assert limit["step_limit_ms"] == pytest.approx(limit["step_bytes"] / env["read_bandwidth_gbs"] / 1e6, rel=1e-3)
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


def test_a_method_alone_runs_beside_the_vanilla_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--methods", "pld", "--limit", "1", "--max-new-tokens", "4", "--warmup", "0",
            "--dtype", "float32", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    records = read_records(out / "results.jsonl")
    assert sorted(r["method"] for r in records) == ["pld", "vanilla"]
    from harness.metrics import records_frame, summarize

    s = summarize(records_frame(records), by=("method",)).set_index("method")
    assert s.loc["pld", "speedup_geomean"] > 0 and s.loc["pld", "exact_match"] == 1.0
    report_line = next(line for line in stdout.splitlines() if line.startswith("Report: "))
    assert report_line == f"Report: {(out / 'report.html').resolve().as_uri()}"
    assert report_line.removeprefix("Report: ").startswith("file://")


def test_repeats_keep_one_whole_round_and_the_report_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--methods", "vanilla", "--limit", "1", "--max-new-tokens", "4", "--dtype", "float32",
            "--device", "cpu", "--warmup", "0", "--repeats", "3", "--out", str(out)]
    assert main(argv) == 0
    (record,) = read_records(out / "results.jsonl")
    rounds = record["repeats"]["wall_times"]
    assert len(rounds) == 3 and record["wall_time"] == sorted(rounds)[1]
    assert json.loads((out / "manifest.json").read_text())["config"]["identity"]["repeats"] == 3
    assert "median of 3 interleaved rounds" in (out / "report.html").read_text()
    # a single-round command may not resume it: the times would mean something else
    assert main([*argv[:-4], "--out", str(out)]) == 2
    assert "repeats" in capsys.readouterr().err
