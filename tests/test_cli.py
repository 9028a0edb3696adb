"""Bad input across the CLI: one line saying what is wrong and what to do, exit 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


BAD_INPUT = [
    (["run", "--methods", "nosuch"], "unknown method 'nosuch'; valid methods: eagle, firp, lookahead, medusa, pld, self_spec, sps, vanilla"),
    (["run", "--tasks", "nosuch"], "unknown task 'nosuch'; valid tasks:"),
    (["run", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["run", "--dtype", "float8"], "unknown dtype 'float8'; valid dtypes: float32, bfloat16, float16, auto"),
    (["run", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["run", "--max-new-tokens", "-5"], "--max-new-tokens must be a positive integer, got -5"),
    (["run", "--max-new-tokens", "lots"], "expected an integer, got 'lots'"),
    (["run", "--limit", "0"], "--limit must be a positive integer"),
    (["run", "--tasks", "builtin:poetry"], "unknown builtin category poetry; valid: chat, math, summarization"),
    (["run", "--methods", "vanilla,vanilla"], "lists a method twice"),
    (["run", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
]


@pytest.mark.parametrize("argv,expected", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(argv, expected, capsys, tmp_path):
    code, err = run_cli(argv + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.skipif(not _no_cuda(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    code, err = run_cli(["run", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no usable CUDA" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = run_cli(["run", "--out", str(locked / "x")], capsys)
    assert code == 2 and "cannot create output directory" in err


def test_out_path_that_is_a_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(["run", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot create output directory" in err


def test_model_folder_without_config(capsys, tmp_path):
    code, err = run_cli(["run", "--model", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is not a Hugging Face model folder" in err


def test_offline_hub_id_fails_clearly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--model", "someorg/somemodel", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Offline?" in proc.stderr and "--model PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_list_names_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("vanilla", "builtin", "smollm2-135m"):
        assert word in out


def test_list_says_which_methods_run_under_concurrency(monkeypatch, capsys):
    """Each method's entry says whether --concurrency accepts it, read from its decoder's ``batchable``."""
    from methods.registry import available_methods, get_spec

    def entries() -> dict[str, list[str]]:
        assert main(["list"]) == 0
        out, blocks, name = capsys.readouterr().out, {}, None
        for line in out.split("Tasks:")[0].splitlines()[1:]:
            if line[2:3].strip():
                name = line.split()[0]
            blocks.setdefault(name, []).append(line.strip())
        return blocks

    blocks = entries()
    assert set(blocks) == set(available_methods())
    assert all("under --concurrency: yes" in lines for lines in blocks.values()), blocks
    monkeypatch.setattr(get_spec("sps").decoder, "batchable", False)
    blocks = entries()
    assert "under --concurrency: no (not batched yet)" in blocks["sps"]
    assert "under --concurrency: yes" in blocks["pld"]


def test_list_shows_eagle_options_under_both_names(capsys):
    """Upstream's names beside ours, each with its mapping, and the preset in both."""
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert any(line.startswith("eagle.depth=5 (int, 1..12)") for line in lines)
    assert any(line.startswith("eagle.upstream_depth=4 (int, 0..11): upstream's depth")
               and line.endswith("depth = upstream_depth + 1") for line in lines)
    assert any(line.startswith("eagle.top_k=4 (int, 1..16)") and line.endswith("topk = top_k") for line in lines)
    assert any(line.startswith("eagle.total_token=-1 (int | str, 2..129)")
               and line.endswith("total = total_token - 1; -1 or auto: auto") for line in lines)
    assert any(line.startswith("eagle.preset=upstream: total_token=60, upstream_depth=5, top_k=10 "
                               "(= depth=6, topk=10, total=59)") for line in lines)


def test_config_mismatch_refuses_to_mix_results(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"config": {"identity": {"max_new_tokens": 1}}}))
    code, err = run_cli(["run", "--out", str(out)], capsys)
    assert code == 2 and "different configuration" in err and "--overwrite" in err


def _fake_run(path, model="smollm2-135m", dtype="float32"):
    """A minimal hand-made run folder: enough for baseline/check, no model needed."""
    path.mkdir(parents=True)
    manifest = {"config": {"model": model}, "dtype": dtype, "environment": {"device": "cpu"},
                "tasks": {"builtin": {"hash": "abc"}}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    turn = {"tokens": [1, 2, 3], "text": "a b c", "wall_time": 0.5, "accepted": [1, 1, 1],
            "draft_sizes": [0, 0, 0], "draft_time": None, "verify_time": None}
    rec = {"task": "builtin", "example_id": "x", "category": "chat", "method": "vanilla", "reference": None,
           "turns": [turn], "new_tokens": 3, "target_forwards": 3, "wall_time": 0.5}
    (path / "results.jsonl").write_text(json.dumps(rec) + "\n")
    return path


def test_check_refuses_run_of_another_model(capsys, tmp_path):
    base_run = _fake_run(tmp_path / "a")
    assert main(["baseline", str(base_run), "-o", str(tmp_path / "b.json")]) == 0
    other = _fake_run(tmp_path / "other", model="someorg/other-model")
    code, err = run_cli(["check", str(other), "--baseline", str(tmp_path / "b.json")], capsys)
    assert code == 2 and "model 'someorg/other-model' but the baseline is for 'smollm2-135m'" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content,message", [
    ("{not json", "corrupted baseline"),
    ('{"format": "something else"}', "is not a specdec-harness baseline"),
])
def test_check_with_corrupted_baseline(capsys, tmp_path, content, message):
    run = _fake_run(tmp_path / "a")
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code, err = run_cli(["check", str(run), "--baseline", str(bad)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_check_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    """The baseline is read first: a missing one says so; with a good one, the folder's fault is named."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(["check", str(empty), "--baseline", str(tmp_path / "b.json")], capsys)
    assert code == 2 and "cannot read baseline" in err and len(err.strip().splitlines()) == 1
    assert main(["baseline", str(_fake_run(tmp_path / "a")), "-o", str(tmp_path / "b.json")]) == 0
    code, err = run_cli(["check", str(empty), "--baseline", str(tmp_path / "b.json")], capsys)
    assert code == 2 and "not a run directory" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method,command", [("medusa", "harness train medusa"), ("firp", "harness train firp")])
def test_missing_trained_heads_names_the_train_command(method, command, capsys, tmp_path):
    folder = tmp_path / "some-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    code, err = run_cli(["run", "--methods", f"vanilla,{method}", "--model", str(folder),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and command in err and len(err.strip().splitlines()) == 1


def test_no_methods_runs_every_ready_method_quickly(monkeypatch, tmp_path, capsys):
    """A first run compares every method ready for the model, with small defaults; given values win."""
    import harness.session as session

    seen = []

    def fake_execute(config):
        seen.append(config)
        raise session.UserError("stop here")

    monkeypatch.setattr(session, "execute", fake_execute)
    main(["run", "--out", str(tmp_path / "a")])
    first = seen[-1]
    assert first.method_labels() == ["vanilla", "eagle", "firp", "lookahead", "medusa", "pld", "self_spec", "sps"]
    assert (first.limit, first.max_new_tokens, first.tasks) == (6, 64, ["builtin"])
    assert first.chosen_methods
    main(["run", "--limit", "2", "--out", str(tmp_path / "b")])
    assert (seen[-1].limit, seen[-1].max_new_tokens) == (2, 64)
    # a model without shipped weights: only the methods that need none
    main(["run", "--model", "someorg/somemodel", "--out", str(tmp_path / "c")])
    assert seen[-1].method_labels() == ["vanilla", "lookahead", "pld"]
    # methods named: the usual defaults (all examples, 128 tokens)
    main(["run", "--methods", "pld", "--out", str(tmp_path / "d")])
    assert (seen[-1].methods, seen[-1].limit, seen[-1].max_new_tokens) == (["pld"], None, 128)
    assert not seen[-1].chosen_methods


def test_dtype_auto_is_where_vanilla_decodes_fastest(monkeypatch):
    """auto = bf16 where the CPU has bf16 units or AVX2-wide kernels (vanilla's step streams half
    the bytes, measured faster on both kinds), float32 on narrower CPUs."""
    import torch

    from harness.models import resolve_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32


def _on_machine(run, **machine):
    """Give a hand-made run a machine record (``old=(cpu, threads)``: an older manifest with only
    ``cpu`` and ``torch_threads``)."""
    manifest = json.loads((run / "manifest.json").read_text())
    old = machine.pop("old", None)
    if old:
        manifest["environment"].update(cpu=old[0], torch_threads=old[1])
    else:
        manifest["environment"]["machine"] = {"kind": "cpu", "name": "AMD EPYC", "vector_units": ["AVX2"],
                                              "threads": 2, "torch": "2.13.0", **machine}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_compare_names_a_machine_difference(capsys, tmp_path):
    a = _on_machine(_fake_run(tmp_path / "a"), vector_units=["AVX2", "AVX512", "AVX512-BF16"])
    b = _on_machine(_fake_run(tmp_path / "b"))
    same = _on_machine(_fake_run(tmp_path / "same"))
    out = str(tmp_path / "c.html")
    assert main(["compare", str(a), str(b), "-o", out]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note:")]
    assert lines == ["note: the runs come from different machines: cpu AMD EPYC (AVX512-BF16) vs AMD EPYC (AVX2)"]
    assert main(["compare", str(b), str(same), "-o", out]) == 0
    assert "note:" not in capsys.readouterr().out
    _on_machine(same, threads=4, torch="2.12.0")
    assert main(["compare", str(b), str(same), "-o", out]) == 0
    assert "different machines: threads 2 vs 4; torch 2.13.0 vs 2.12.0" in capsys.readouterr().out
    # older manifests: the cpu model and thread count they recorded
    old_a = _on_machine(_fake_run(tmp_path / "old_a"), old=("Intel Xeon", 8))
    old_b = _on_machine(_fake_run(tmp_path / "old_b"), old=("Intel Xeon", 2))
    assert main(["compare", str(old_a), str(old_b), "-o", out]) == 0
    assert "note: the runs come from different machines: threads 8 vs 2" in capsys.readouterr().out
    assert main(["compare", str(old_a), str(b), "-o", out]) == 0
    assert "cpu Intel Xeon vs AMD EPYC (AVX2); threads 8 vs 2" in capsys.readouterr().out


def test_check_names_a_machine_difference_from_the_baseline(capsys, tmp_path):
    base = _on_machine(_fake_run(tmp_path / "a"), name="Intel Xeon", vector_units=["AVX2", "AVX512", "AMX"])
    assert main(["baseline", str(base), "-o", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["machine"]["name"] == "Intel Xeon"
    capsys.readouterr()
    run = _on_machine(_fake_run(tmp_path / "run"))
    assert main(["check", str(run), "--baseline", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "note: the baseline and the run come from different machines: cpu Intel Xeon (AMX) vs AMD EPYC (AVX2)" \
        in out
    assert main(["check", str(base), "--baseline", str(tmp_path / "b.json")]) == 0
    assert "note:" not in capsys.readouterr().out
    older = json.loads((tmp_path / "b.json").read_text())
    del older["machine"]  # a baseline written before machines were recorded knows only the device
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert main(["check", str(run), "--baseline", str(tmp_path / "old.json")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_check_compares_counters_only_at_one_repeat(capsys, tmp_path):
    """With --repeats the kept round is the one of median time, so its counters depend on timing
    for methods that learn across prompts: they are compared only at one round, and the check
    says why it skips them."""
    run = _fake_run(tmp_path / "a")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["costs"] = {"curve": {"sizes": [1, 2], "ratios": [1.0, 1.1]}, "calls": {}, "pinned": True}
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["baseline", str(run), "-o", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    assert main(["check", str(run), "--baseline", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "draft_size" in out and "counters not compared" not in out
    manifest["config"]["repeats"] = 2
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["check", str(run), "--baseline", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "counters not compared: --repeats 2" in out and "draft_size" not in out


def test_records_written_before_an_option_existed_still_compare_and_resume():
    """A manifest or baseline from before ``self_spec.rule``/``lookahead.init`` lacks those keys; it
    ran what their defaults run now, so ``check``, ``compare`` and resuming accept it, and a setting
    that really differs is still named."""
    from dataclasses import asdict

    from base.errors import UserError
    from harness.checks import settings_differ
    from harness.config import RunConfig, complete_options, parse_method_runs
    from harness.rundir import _check_compatible, jsonable

    runs = parse_method_runs(["self_spec", "lookahead", "self_spec@rule=paper"], {})
    now = {r.label: jsonable(r.options_dict()) for r in runs}
    added = {"self_spec": ("rule", "epsilon", "beta1", "beta2"), "lookahead": ("init",)}
    old = {label: {k: v for k, v in now[label].items() if k not in added[label]} for label in added}
    assert all(old[label] != now[label] and complete_options(label, old[label]) == now[label] for label in added)
    generation = {"max_new_tokens": 8}
    assert settings_differ({"generation": generation, "method_options": old},
                           {"generation": generation, "method_options": now}) == []
    moved = {**old, "self_spec": {**old["self_spec"], "threshold": 0.5}}
    assert settings_differ({"generation": generation, "method_options": moved},
                           {"generation": generation, "method_options": now}) == ["options of self_spec"]
    config = RunConfig(methods=["self_spec", "lookahead"])
    manifest = {"config": {"identity": config.identity()}, "method_options": old}
    _check_compatible(config, Path("out"), Path("out/manifest.json"), manifest, {}, runs[:2])  # resumes
    with pytest.raises(UserError, match=r"differs in: threshold"):
        _check_compatible(config, Path("out"), Path("out/manifest.json"), {**manifest, "method_options": moved}, {},
                          runs[:2])
    # the committed CI baseline predates both options and still reads as today's shipped defaults
    baseline = json.loads((Path(__file__).parent / "baselines" / "smollm2-135m-cpu-float32.json").read_text())
    for label in ("self_spec", "lookahead"):
        assert complete_options(label, baseline["method_options"][label]) == now[label]
    assert asdict(runs[2].options)["policy"] == "always"
