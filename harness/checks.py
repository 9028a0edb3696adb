"""Regression checks for CI: ``baseline`` freezes a run's metrics, ``check`` compares a run to it.

Deterministic metrics (mean accepted length, exact match, Rouge-2) are exact on CPU in
float32, so their default tolerances are tight. Timing is noisy on shared machines, so
speedup only has to stay above a loose fraction of the baseline's.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from base.errors import UserError
from base.files import check_writable, read_json, require_shape, write_text
from methods.core.hardware import machine_label
from harness.metrics import records_frame, summarize
from harness.results import read_manifest, read_run_records

# /2: speedup is the per-token ratio (method tokens/s / vanilla tokens/s); /1 divided wall times.
FORMAT = "specdec-harness-baseline/2"
REGENERATE = "`python -m harness baseline RUN_DIR -o FILE`"
METRICS = ("mean_accepted_length", "exact_match", "rouge2", "speedup_geomean")


def run_metrics(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, per method x task metric rows) of a run folder."""
    manifest = read_manifest(run_dir)
    frame = records_frame(read_run_records(run_dir))
    if frame.empty:
        raise UserError(f"{run_dir} has no completed generations; finish the run first")
    rows = summarize(frame, by=("method", "task")).to_dict("records")
    return manifest, rows


GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p")


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    config = manifest.get("config", {})
    return {
        "model": config.get("model"),
        "dtype": manifest.get("dtype"),
        "device": manifest.get("environment", {}).get("device"),
        "task_hashes": {k: v.get("hash") for k, v in manifest.get("tasks", {}).items()},
        "generation": {k: config.get(k, {"temperature": 0.0, "top_p": 1.0}.get(k)) for k in GENERATION_KEYS},
        "method_options": manifest.get("method_options", {}),
    }


def machine_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """A run's machine fingerprint: kind, CPU model and vector units or GPU
    name, threads, torch version. Older manifests without ``environment.machine`` give what
    they recorded (``cpu``, ``gpu``, ``device``, ``torch_threads``); what is unknown is None."""
    env = manifest.get("environment") or {}
    if env.get("machine"):
        return env["machine"]
    gpu = env.get("gpu") or {}
    return {"kind": str(env.get("device") or "").split(":")[0] or None,
            "name": gpu.get("name") or env.get("cpu"), "vector_units": None,
            "threads": env.get("torch_threads"), "torch": (env.get("versions") or {}).get("torch")}


def baseline_machine(baseline: dict[str, Any]) -> dict[str, Any]:
    """The machine a baseline file was written from; older files know only the device."""
    return baseline.get("machine") or {"kind": str(baseline.get("device") or "").split(":")[0] or None}


def machine_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two machine fingerprints, in words; entries either side lacks are
    not compared (an older manifest does not know its vector units)."""

    def known(key: str) -> bool:
        return a.get(key) is not None and b.get(key) is not None and a[key] != b[key]

    def bare(m: dict[str, Any]) -> str:  # threads get their own entry
        return machine_label({k: v for k, v in m.items() if k != "threads"})

    if known("kind"):
        return [f"device {a['kind']} vs {b['kind']}"]
    out = []
    if known("name") or known("vector_units"):
        left, right = bare(a), bare(b)
        if left == right:  # the strongest unit is the same: name every unit
            left, right = (f"{m.get('name')} ({', '.join(m['vector_units']) or 'none'})" for m in (a, b))
        out.append(f"{'gpu' if a.get('kind') == 'cuda' else 'cpu'} {left} vs {right}")
    if known("threads"):
        out.append(f"threads {a['threads']} vs {b['threads']}")
    if known("torch"):
        out.append(f"torch {a['torch']} vs {b['torch']}")
    return out


def machine_note(a: dict[str, Any], b: dict[str, Any], what: str = "the runs") -> str | None:
    """One line naming the difference when two machine fingerprints (``machine_of``,
    ``baseline_machine``) differ: speeds then differ for reasons that are not the method's."""
    differ = machine_differences(a, b)
    return f"note: {what} come from different machines: {'; '.join(differ)}" if differ else None


def settings_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What makes two runs' numbers incomparable beyond model and examples: generation settings, method options."""
    out = [f"{k} {a['generation'].get(k)} vs {b['generation'].get(k)}" for k in GENERATION_KEYS
           if a["generation"].get(k) != b["generation"].get(k)]
    for label in sorted(set(a["method_options"]) & set(b["method_options"])):
        if a["method_options"][label] != b["method_options"][label]:
            out.append(f"options of {label}")
    return out


def write_baseline(run_dir: Path, out: Path) -> dict[str, Any]:
    check_writable(out, "-o")
    manifest, rows = run_metrics(run_dir)
    baseline = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source_run": str(run_dir),
        **_identity(manifest),
        "machine": machine_of(manifest),
        "entries": [
            {"method": r["method"], "task": r["task"], **{m: _clean(r[m]) for m in METRICS}} for r in rows
        ],
    }
    write_text(out, json.dumps(baseline, indent=2) + "\n", "-o")
    return baseline


def _clean(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def read_baseline(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"cannot read baseline {path}: no such file; write one with "
                        "`python -m harness baseline RUN_DIR -o FILE`")
    data = read_json(path, f"corrupted baseline: regenerate it with {REGENERATE}", expect=None)
    if isinstance(data, dict) and data.get("format") == "specdec-harness-baseline/1":
        raise UserError(f"{path} is a baseline of the old format (speedup as a ratio of wall times); its speedups "
                        "do not compare with today's per-token speedups: regenerate it with "
                        "`python -m harness baseline RUN_DIR -o FILE`")
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise UserError(f"{path} is not a specdec-harness baseline (format {FORMAT}); regenerate it with "
                        "`python -m harness baseline RUN_DIR -o FILE`")
    require_shape(data, {"generation": dict, "method_options": dict, "task_hashes": dict}, str(path),
                  f"regenerate it with {REGENERATE}")
    for i, entry in enumerate(data["entries"]):
        if not isinstance(entry, dict) or not {"method", "task"} <= entry.keys():
            raise UserError(f"{path}: entry {i} lacks 'method'/'task'; regenerate it with {REGENERATE}")
        for metric in METRICS:
            value = entry.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"{path}: entry {i} has {metric} {value!r}, not a number; "
                                f"regenerate it with {REGENERATE}")
    return data


@dataclass
class Tolerances:
    accepted_length: float = 0.01   # absolute drop allowed in mean accepted length
    exact_match: float = 0.0        # absolute drop allowed in exact-match rate
    rouge2: float = 0.005           # absolute drop allowed in Rouge-2
    speedup_floor: float = 0.5      # speedup must stay >= this fraction of the baseline's


@dataclass
class Finding:
    method: str
    task: str
    metric: str
    baseline: float | None
    current: float | None
    limit: float | None
    ok: bool


def compare(baseline: dict[str, Any], run_dir: Path, tol: Tolerances, *, force: bool = False) -> list[Finding]:
    manifest, rows = run_metrics(run_dir)
    ident = _identity(manifest)
    for key in ("model", "dtype", "device"):
        if baseline.get(key) != ident[key]:
            raise UserError(
                f"{run_dir} was run with {key} {ident[key]!r} but the baseline is for {baseline.get(key)!r}; "
                "compare like with like, or write a new baseline"
            )
    if not force and baseline.get("task_hashes") != ident["task_hashes"]:
        raise UserError(f"{run_dir} used different examples than the baseline (task hashes differ); "
                        "rerun with the baseline's task settings, or pass --force")
    if not force and "generation" in baseline:
        differ = settings_differ({"generation": baseline["generation"],
                                  "method_options": baseline.get("method_options", {})}, ident)
        if differ:
            raise UserError(f"{run_dir} was run with other settings than the baseline ({'; '.join(differ)}); "
                            "rerun with the baseline's settings, or pass --force")
    current = {(r["method"], r["task"]): r for r in rows}
    findings: list[Finding] = []
    for entry in baseline["entries"]:
        key = (entry["method"], entry["task"])
        row = current.get(key)
        if row is None:
            findings.append(Finding(*key, "present in run", None, None, None, False))
            continue
        checks = [
            ("mean_accepted_length", lambda b: b - tol.accepted_length),
            ("exact_match", lambda b: b - tol.exact_match),
            ("rouge2", lambda b: b - tol.rouge2),
            ("speedup_geomean", lambda b: b * tol.speedup_floor),
        ]
        for metric, limit_of in checks:
            base, cur = entry.get(metric), _clean(row.get(metric))
            if base is None:
                continue
            limit = limit_of(base)
            ok = cur is not None and cur >= limit - 1e-12
            findings.append(Finding(*key, metric, base, cur, limit, ok))
    return findings
