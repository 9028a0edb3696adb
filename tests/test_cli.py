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
    (["run", "--methods", "nosuch"], "unknown method 'nosuch'; valid methods: vanilla"),
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


def test_config_mismatch_refuses_to_mix_results(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"config": {"identity": {"max_new_tokens": 1}}}))
    code, err = run_cli(["run", "--out", str(out)], capsys)
    assert code == 2 and "different configuration" in err and "--overwrite" in err
