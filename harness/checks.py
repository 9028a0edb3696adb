"""Regression checks for CI: ``baseline`` freezes a run, ``check`` compares a run to it.

What a run does is deterministic on CPU in float32 once its measured costs are fixed, so
the check reads it exactly: every method's token ids against the baseline's own, accepted
tokens, draft and processed tokens and host synchronisations per step, target forwards per
token, and the choices ``auto`` and the cost policies made. A run that replays the
baseline's costs (``run --costs-from BASELINE``) makes the same choices on any machine, so
these rows hold across hardware. Speed is compared only against a baseline from the same
machine (CPU or GPU model, vector units, threads, torch), and a speedup regresses when its
speedup, divided by its own speedup in the baseline example by example, has a bootstrap
interval wholly below 1 by more than a small margin (5%): the tolerance is the measured
spread, and a few percent of drift is not called a regression.
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
from harness.config import complete_options
from harness.metrics import lowest_level, records_frame, summarize
from harness.results import read_manifest, read_run_records

# /3: token ids, counters, the cost record and the choices it led to, per-example speedups, the machine.
# /2: speedup is the per-token ratio (method tokens/s / vanilla tokens/s); /1 divided wall times.
FORMAT = "specdec-harness-baseline/3"
READABLE = ("specdec-harness-baseline/2", FORMAT)
REGENERATE = "`python -m harness baseline RUN_DIR -o FILE`"
METRICS = ("mean_accepted_length", "exact_match", "rouge2", "speedup_geomean", "speedup_ci_low", "speedup_ci_high",
           "draft_size", "processed_per_step", "forwards_per_token", "syncs_per_step")
COUNTERS = ("mean_accepted_length", "draft_size", "processed_per_step", "forwards_per_token", "syncs_per_step")
CHOICE_KEYS = ("tree", "shape", "draft_size", "fitted")


def run_metrics(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(manifest, per method x task metric rows) of a run folder."""
    return _run_metrics(run_dir)[:2]


def _run_metrics(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], Any]:
    manifest = read_manifest(run_dir)
    frame = records_frame(lowest_level(read_run_records(run_dir)))
    if frame.empty:
        raise UserError(f"{run_dir} has no completed generations; finish the run first")
    rows = summarize(frame, by=("method", "task")).to_dict("records")
    return manifest, rows, frame


def token_ids(frame: Any) -> dict[str, dict[str, dict[str, list[int]]]]:
    """{method: {task: {example id: token ids}}} of a run's records."""
    out: dict[str, dict[str, dict[str, list[int]]]] = {}
    for r in frame.itertuples():
        out.setdefault(r.method, {}).setdefault(r.task, {})[str(r.example_id)] = [int(t) for t in r.token_ids]
    return out


def example_speedups(frame: Any) -> dict[tuple[str, str], dict[str, float]]:
    """{(method, task): {example id: method tokens/s over vanilla's}}: what the speed check pairs."""
    from harness.metrics import paired_with_baseline

    out: dict[tuple[str, str], dict[str, float]] = {}
    for r in paired_with_baseline(frame).itertuples():
        if min(r.new_tokens, r.new_tokens_base, r.wall_time, r.wall_time_base) > 0:
            ratio = (r.new_tokens / r.wall_time) / (r.new_tokens_base / r.wall_time_base)
            out.setdefault((r.method, r.task), {})[str(r.example_id)] = round(float(ratio), 5)
    return out


def choices(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each method decided at setup from the measured costs: its tree or shape, draft size,
    and the ``fitted`` verdict (drafting or plain steps), rounded so a replay compares exactly."""
    out = {}
    for label, info in (manifest.get("methods") or {}).items():
        picked = {k: info[k] for k in CHOICE_KEYS if k in info}
        if isinstance(picked.get("fitted"), dict):
            fit = picked["fitted"]
            picked["fitted"] = {"drafting": fit.get("drafting"),
                                "best_predicted_speedup": round(float(fit.get("best_predicted_speedup") or 0), 3)}
        if picked:
            out[label] = json.loads(json.dumps(picked))  # tuples as lists, as a file holds them
    return out


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
        if complete_options(label, a["method_options"][label]) != complete_options(label, b["method_options"][label]):
            out.append(f"options of {label}")
    return out


def write_baseline(run_dir: Path, out: Path) -> dict[str, Any]:
    check_writable(out, "-o")
    manifest, rows, frame = _run_metrics(run_dir)
    speedups = example_speedups(frame)
    baseline = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source_run": str(run_dir),
        **_identity(manifest),
        "repeats": int((manifest.get("config") or {}).get("repeats") or 1),
        "machine": machine_of(manifest),
        "costs": manifest.get("costs"),
        "choices": choices(manifest),
        "entries": [
            {"method": r["method"], "task": r["task"], **{m: _clean(r.get(m)) for m in METRICS},
             "speedups": speedups.get((r["method"], r["task"]), {})} for r in rows
        ],
        "tokens": token_ids(frame),
    }
    write_text(out, json.dumps(baseline, indent=1) + "\n", "-o")
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
    if not isinstance(data, dict) or data.get("format") not in READABLE or not isinstance(data.get("entries"), list):
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
    for i, entry in enumerate(data["entries"]):
        speedups = entry.get("speedups", {})
        if not isinstance(speedups, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in speedups.values()):
            raise UserError(f"{path}: entry {i} has speedups that are not {{example: number}}; "
                            f"regenerate it with {REGENERATE}")
    tokens = data.get("tokens", {})
    if not isinstance(tokens, dict) or not all(
            isinstance(tasks, dict) and all(isinstance(ex, dict) and all(
                isinstance(ids, list) and all(isinstance(t, int) for t in ids) for ids in ex.values())
                for ex in tasks.values()) for tasks in tokens.values()):
        raise UserError(f"{path}: 'tokens' is not {{method: {{task: {{example: [ids]}}}}}}; regenerate it with {REGENERATE}")
    if not isinstance(data.get("repeats", 1), int) or isinstance(data.get("repeats", 1), bool):
        raise UserError(f"{path}: 'repeats' is not an integer; regenerate it with {REGENERATE}")
    if not isinstance(data.get("choices", {}), dict):
        raise UserError(f"{path}: 'choices' is not an object; regenerate it with {REGENERATE}")
    if data.get("costs") is not None:
        from methods.core.cost import check_cost_record

        check_cost_record(data["costs"], str(path))
    return data


@dataclass
class Tolerances:
    accepted_length: float = 0.01   # absolute drop allowed in mean accepted length (a run measuring its own costs)
    exact_match: float = 0.0        # absolute drop allowed in exact-match rate
    rouge2: float = 0.005           # absolute drop allowed in Rouge-2
    counter: float = 1e-6           # absolute change allowed in a counter of a replayed run (they are exact)
    speed_margin: float = 0.05      # the paired speedup ratio's interval must end this far below 1 to fail
    speedup_floor: float | None = None  # a fixed floor (fraction of the baseline's speedup) instead of the intervals


@dataclass
class Finding:
    method: str
    task: str
    metric: str
    baseline: float | str | None
    current: float | str | None
    limit: float | str | None
    ok: bool


def replays(baseline: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """The run replayed the baseline's cost record (every cost it used is the baseline's), so
    its choices and counters must match the baseline's exactly."""
    mine, theirs = manifest.get("costs") or {}, baseline.get("costs") or {}
    if not mine.get("pinned") or not theirs or mine.get("curve") != theirs.get("curve"):
        return False
    recorded = theirs.get("calls") or {}
    return all(name in recorded and recorded[name] == value for name, value in (mine.get("calls") or {}).items())


def compare(baseline: dict[str, Any], run_dir: Path, tol: Tolerances, *,
            force: bool = False) -> tuple[list[Finding], list[str]]:
    """(findings, notes): one finding per checked value, and one line per kind of row not compared and why."""
    manifest, rows, frame = _run_metrics(run_dir)
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
    notes: list[str] = []
    replayed = replays(baseline, manifest)
    if baseline.get("costs") and not replayed:
        notes.append("counters and choices not compared: the run measured its own costs; run it with "
                     "--costs-from BASELINE to replay the baseline's")
    repeats = max(int((manifest.get("config") or {}).get("repeats") or 1),
                  int(baseline.get("repeats") or 1))
    counted = replayed and repeats == 1
    if replayed and not counted:
        # the round kept per example is the one of median time, and methods that learn across
        # prompts (EAGLE, SpS, self_spec) reach each round in another state: which round's
        # counters are kept then depends on timing
        notes.append(f"counters not compared: --repeats {repeats} keeps each example's round of median time, "
                     "whose counters depend on timing for methods that learn across prompts")
    differ = machine_differences(baseline_machine(baseline), machine_of(manifest))
    unknown = not baseline.get("machine") or not (manifest.get("environment") or {}).get("machine")
    same_machine = not differ and not unknown
    if not same_machine and tol.speedup_floor is None:
        why = "; ".join(differ) if differ else "the baseline does not record its machine"
        notes.append(f"speed not compared: the baseline comes from another machine ({why}); "
                     "write a baseline on this machine to guard speed here")
    current = {(r["method"], r["task"]): r for r in rows}
    speedups = example_speedups(frame)
    findings: list[Finding] = []
    for entry in baseline["entries"]:
        key = (entry["method"], entry["task"])
        row = current.get(key)
        if row is None:
            findings.append(Finding(*key, "present in run", None, None, None, False))
            continue
        checks = [("exact_match", lambda b: b - tol.exact_match), ("rouge2", lambda b: b - tol.rouge2)]
        if not counted:
            checks.insert(0, ("mean_accepted_length", lambda b: b - tol.accepted_length))
        for metric, limit_of in checks:
            base, cur = entry.get(metric), _clean(row.get(metric))
            if base is None:
                continue
            limit = limit_of(base)
            findings.append(Finding(*key, metric, base, cur, limit, cur is not None and cur >= limit - 1e-12))
        if counted:
            for metric in COUNTERS:
                base, cur = entry.get(metric), _clean(row.get(metric))
                if base is None:
                    continue
                ok = cur is not None and abs(cur - base) <= tol.counter
                findings.append(Finding(*key, metric, base, cur, f"= {base:.4f}", ok))
        findings.extend(_speed(entry, row, speedups.get(key, {}), tol, same_machine, key))
    findings.extend(_token_findings(baseline.get("tokens") or {}, token_ids(frame)))
    if replayed:
        mine = choices(manifest)
        for label, picked in (baseline.get("choices") or {}).items():
            got = mine.get(label)
            findings.append(Finding(label, "-", "choice at setup", _short(picked), _short(got), "the same",
                                    got == picked))
    return findings, notes


def _speed(entry: dict[str, Any], row: dict[str, Any], now: dict[str, float], tol: Tolerances,
           same_machine: bool, key: tuple[str, str]) -> list[Finding]:
    """Each example's speedup over its speedup in the baseline, paired (so what an example's
    text does to a method, the largest spread between examples, cancels); a regression is a
    bootstrap interval of their geometric mean wholly below 1 - ``speed_margin``."""
    from harness.metrics import bootstrap_geomean_ci, geometric_mean

    base, cur = entry.get("speedup_geomean"), _clean(row.get("speedup_geomean"))
    if base is None or key[0] == "vanilla":
        return []

    def floor(fraction: float) -> list[Finding]:
        limit = base * fraction
        return [Finding(*key, "speedup_geomean", base, cur, limit, cur is not None and cur >= limit - 1e-12)]

    if tol.speedup_floor is not None:
        return floor(tol.speedup_floor)
    if not same_machine:
        return []
    before = entry.get("speedups") or {}
    ratios = [now[ex] / before[ex] for ex in before if ex in now and before[ex] > 0]
    if not ratios:  # an older baseline without per-example speedups: the old fixed floor
        return floor(0.5)
    low, high = bootstrap_geomean_ci(ratios)
    limit = 1 - tol.speed_margin
    return [Finding(*key, "speedup / baseline's (paired)", 1.0, f"{geometric_mean(ratios):.3f} [{low:.3f}, {high:.3f}]",
                    limit, high >= limit)]


def _token_findings(base: dict[str, Any], now: dict[str, Any]) -> list[Finding]:
    """Per method and task: examples whose token ids equal the baseline's own."""
    out = []
    for method, tasks in base.items():
        for task, examples in tasks.items():
            got = now.get(method, {}).get(task, {})
            same = sum(1 for ex, ids in examples.items() if got.get(ex) == ids)
            out.append(Finding(method, task, "token ids as in baseline", float(len(examples)), float(same),
                               float(len(examples)), same == len(examples)))
    return out


def _short(value: Any) -> str:
    text = "-" if value is None else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."
