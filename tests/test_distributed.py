"""Runs that outgrow one process: ``--shard I/N`` files merged by every reader, one writer per
results file, and ``--executor ray`` (two CPU actors on a local cluster) equal to a local run.

Every end-to-end run here uses ``tiny_model_dir`` (a 2-layer random Llama with the default
model's tokenizer), so the decoding is deterministic and takes seconds.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.results import ResultsWriter, WriterLock, parse_shard, read_manifest, read_run_records
from methods.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--methods", "pld", "--limit", "4", "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu",
          "--warmup", "0"]


def _run(model: Path, out: Path, *extra: str) -> int:
    return main(["run", "--model", str(model), *COMMON, "--out", str(out), *extra])


def _essence(records):
    """What must not depend on how the work was spread: the token ids and accepted lengths."""
    return sorted((r["task"], r["example_id"], r["method"], tuple(x for t in r["turns"] for x in t["tokens"]),
                   tuple(a for t in r["turns"] for a in t["accepted"])) for r in records)


def _keys(records):
    return [(r["task"], r["example_id"], r["method"]) for r in records]


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory) -> Path:
    """The reference: the same run in one process, unsharded."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert _run(tiny_model_dir, out) == 0
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- shards -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_is_one_line(text, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(UserError):
        parse_shard(text)
    assert _run(tiny_model_dir, tmp_path / "run", "--shard", text) == 2
    assert "--shard expects I/N" in _one_error_line(capsys)


def test_shards_merge_into_the_single_process_result(single, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert _run(tiny_model_dir, out, "--shard", "2/2") == 0
    partial = read_manifest(out)
    assert partial["status"].startswith("partial (1 of 2 shards")
    assert _run(tiny_model_dir, out, "--shard", "1/2") == 0
    assert sorted(p.name for p in out.glob("results*.jsonl")) == ["results.shard-1-of-2.jsonl",
                                                                   "results.shard-2-of-2.jsonl"]
    parts = [len(json.loads(line)["turns"]) for p in out.glob("results.shard-*.jsonl")
             for line in p.read_text().splitlines()]
    assert len(parts) == 8  # 4 examples x (vanilla, pld), split 2 + 2 examples
    merged = read_run_records(out)
    assert _essence(merged) == _essence(read_run_records(single))
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and len(manifest["shards"]) == 2
    assert all(s["environment"]["torch_threads"] >= 1 for s in manifest["shards"])
    # every reader goes through the merge: report, baseline, check
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert main(["baseline", str(out), "-o", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["entries"]
    assert main(["check", str(single), "--baseline", str(tmp_path / "b.json"), "--speedup-floor", "0"]) == 0
    assert main(["compare", str(single), str(out), "-o", str(tmp_path / "c.html")]) == 0
    # resuming a finished shard decodes nothing
    assert _run(tiny_model_dir, out, "--shard", "1/2") == 0
    assert len(read_run_records(out)) == 8


def test_a_shard_of_another_configuration_is_refused(tiny_model_dir, tmp_path, capsys):
    out, other = tmp_path / "sharded", tmp_path / "other"
    assert _run(tiny_model_dir, out, "--shard", "1/2") == 0
    capsys.readouterr()
    # at start: the folder's other shard was made with other settings
    assert _run(tiny_model_dir, out, "--shard", "2/2", "--seed", "1") == 2
    assert "differs in: seed" in _one_error_line(capsys)
    # other splits and unsharded runs do not mix into the folder
    assert _run(tiny_model_dir, out, "--shard", "1/3") == 2
    assert "another split" in _one_error_line(capsys)
    assert _run(tiny_model_dir, out) == 2
    assert "sharded run" in _one_error_line(capsys)
    # when reading: a conflicting shard's files copied in are refused by every reader, one line each
    assert _run(tiny_model_dir, other, "--shard", "2/2", "--max-new-tokens", "4") == 0
    for name in ("manifest.shard-2-of-2.json", "results.shard-2-of-2.jsonl"):
        shutil.copy(other / name, out / name)
    capsys.readouterr()
    for argv in (["report", str(out)], ["baseline", str(out), "-o", str(tmp_path / "b.json")],
                 ["compare", str(out), str(other), "-o", str(tmp_path / "c.html")]):
        assert main(argv) == 2
        assert "disagree on the configuration (differs in: max_new_tokens)" in _one_error_line(capsys)


def test_a_shard_with_another_task_hash_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sharded"
    assert _run(tiny_model_dir, out, "--shard", "1/2") == 0
    assert _run(tiny_model_dir, out, "--shard", "2/2") == 0
    path = out / "manifest.shard-2-of-2.json"
    manifest = json.loads(path.read_text())
    manifest["tasks"]["builtin"]["hash"] = "0" * 16
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "disagree on the task hash" in _one_error_line(capsys)


# --- one writer per results file ----------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path) as writer:
        writer.write({"task": "t", "example_id": "1", "method": "vanilla"})
        with pytest.raises(UserError, match=rf"another run \(pid {os.getpid()}\) is writing"):
            ResultsWriter(path)
    with ResultsWriter(path) as writer:  # released on close
        writer.write({"task": "t", "example_id": "2", "method": "vanilla"})
    assert path.read_text().count("\n") == 2


def test_a_killed_writers_lock_does_not_block(tmp_path):
    path = tmp_path / "results.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from harness.results import WriterLock; "
        f"WriterLock(Path({str(path)!r})).acquire(); print('locked', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=rf"pid {holder.pid}"):
        WriterLock(path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "results.jsonl.lock").exists()  # stale file left behind, but it locks nothing
    WriterLock(path).acquire().release()


def test_a_refusal_names_a_holder_that_has_locked_but_not_yet_written_its_pid(tmp_path):
    """The window between a holder's flock and its pid write: the refusal waits for the pid."""
    path = tmp_path / "results.jsonl"
    lock_file = tmp_path / "results.jsonl.lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, file still empty
    writer = threading.Timer(0.2, lambda: os.pwrite(fd, b"4242\n", 0))
    writer.start()
    try:
        with pytest.raises(UserError, match=r"another run \(pid 4242\) is writing"):
            WriterLock(path).acquire()
    finally:
        writer.join()
        os.close(fd)


def test_two_concurrent_runs_never_duplicate_a_record(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "harness", "run", "--model", str(tiny_model_dir), *COMMON,
            "--max-new-tokens", "32", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    winner = next(p for p, (code, _) in zip(procs, results) if code == 0)
    assert f"error: another run (pid {winner.pid}) is writing" in refused and "Traceback" not in refused
    keys = _keys(read_run_records(out))
    assert len(keys) == len(set(keys)) == 8


# --- Ray ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster of two 1-CPU workers for this module; shut down after it."""
    ray = pytest.importorskip("ray")
    from harness.ray_executor import runtime_env

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env(), logging_level="ERROR")
    print(f"ray cluster up in {time.perf_counter() - started:.1f} s")
    yield ray
    ray.shutdown()


def test_missing_ray_is_one_line(monkeypatch, tiny_model_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert _run(tiny_model_dir, tmp_path / "run", "--executor", "ray") == 2
    assert 'pip install -e ".[ray]"' in _one_error_line(capsys)


def test_an_unreachable_ray_address_is_one_line_within_seconds(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.perf_counter()
    assert _run(tiny_model_dir, tmp_path / "run", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}") == 2
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in _one_error_line(capsys)
    assert time.perf_counter() - started < 60  # ray.init alone would retry for minutes


def test_ray_flags_need_the_ray_executor(tiny_model_dir, tmp_path, capsys):
    assert _run(tiny_model_dir, tmp_path / "run", "--workers", "2") == 2
    assert "only apply with --executor ray" in _one_error_line(capsys)


def test_ray_run_equals_the_single_process_run(ray_cluster, single, tiny_model_dir, tmp_path):
    out = tmp_path / "ray"
    assert _run(tiny_model_dir, out, "--executor", "ray", "--workers", "2", "--threads-per-worker", "1") == 0
    records = read_run_records(out)
    assert _essence(records) == _essence(read_run_records(single))
    manifest = read_manifest(out)
    assert manifest["status"] == "complete"
    assert manifest["executor"]["workers"] == 2
    assert [e["torch_threads"] for e in manifest["executor"]["worker_environments"]] == [1, 1]
    assert (out / "divergences.jsonl").read_text() == (single / "divergences.jsonl").read_text()
    assert ray_cluster.is_initialized()  # a cluster it joined is left running


def test_a_killed_actor_s_examples_are_run_again_exactly_once(ray_cluster, tiny_model_dir):
    from harness.config import RunConfig, validate
    from harness.executors import make_executor
    from harness.runner import run_shard
    from harness.session import load_examples
    from harness.workbench import build_workbench

    config = RunConfig(methods=["pld"], model=str(tiny_model_dir), device="cpu", dtype="float32", max_new_tokens=8,
                       limit=6, warmup=0, executor="ray", workers=2, threads_per_worker=1)
    runs = validate(config)
    examples, _ = load_examples(config)
    done = {(examples[0].task, examples[0].id, "vanilla")}  # resume: one record already on disk
    pool = make_executor(config, runs)
    records = []

    def emit(record):
        records.append(record)
        if len(records) == 1:  # the other actor is mid-example (or about to be handed one)
            ray_cluster.kill(pool.actors[1])

    try:
        pool.describe()
        pool.run(examples, done, emit)
    finally:
        pool.close()
    assert pool.requeued >= 1 and len(pool.alive) == 1
    keys = _keys(records)
    assert len(keys) == len(set(keys)) == 6 * 2 - 1
    assert set(keys) | done == {(e.task, e.id, m) for e in examples for m in ("vanilla", "pld")}

    bench = build_workbench(config.decode_spec(runs))
    reference = []
    run_shard(examples, bench.decoders, bench.tokenizer, bench.settings, reference.append, done)
    assert _essence(records) == _essence(reference)


def test_a_ray_load_run_serves_each_share_as_its_own_batch(ray_cluster, single, tiny_model_dir, tmp_path):
    """``--concurrency`` under ``--executor ray``: every (example, method, level) is recorded once,
    each record carries its batch's load summary, and every level gives batch-1's token ids
    (float32), as a local load run does."""
    out = tmp_path / "ray-load"
    assert _run(tiny_model_dir, out, "--executor", "ray", "--workers", "2", "--threads-per-worker", "1",
                "--concurrency", "1,2") == 0
    records = read_run_records(out)
    keys = [(*k, r["concurrency"]) for k, r in zip(_keys(records), records)]
    assert len(keys) == len(set(keys)) == 4 * 2 * 2
    assert {r["concurrency"] for r in records} == {1, 2}
    for r in records:
        assert r["load"]["requests"] == r["concurrency"] and r["load"]["steps"] > 0 and r["load"]["chunk"]
    reference = {(r["task"], r["example_id"], r["method"]): r["turns"][0]["tokens"] for r in read_run_records(single)}
    assert all(r["turns"][0]["tokens"] == reference[(r["task"], r["example_id"], r["method"])] for r in records)
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["executor"]["workers"] == 2
