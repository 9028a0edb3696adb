"""The ``run`` command end to end: validate, load tasks and model, resume, run, summarise.

All validation that can fail on user input happens *before* the model loads, so a typo
costs a second, not a model load.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from methods.core.errors import UserError
from harness.results import (
    DIVERGENCES_FILE,
    MANIFEST_FILE,
    RESULTS_FILE,
    ResultsWriter,
    read_records,
    record_key,
    write_manifest,
)
from methods.core.options import parse_options
from methods.registry import get_spec
from tasks.base import Example, TaskOptions, load_task, split_spec, task_hash

BASELINE = "vanilla"


@dataclass(frozen=True)
class MethodRun:
    """One row of a run: a method, or a variant of one (``medusa@tree=8x4x2``), and its parsed options."""

    label: str
    name: str
    options: Any

    def options_dict(self) -> dict[str, Any]:
        return asdict(self.options)


def split_methods(text: str) -> list[str]:
    """``--methods`` split on commas outside brackets, so a variant may carry a JSON tree."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_method_runs(labels: list[str], method_options: dict[str, dict[str, Any]]) -> list[MethodRun]:
    """Labels like ``firp`` or ``medusa@tree=8x4x2@heads=DIR``; ``--method-option`` values apply to every
    variant of their method, a variant's own settings override them. All checked before the model loads."""
    runs: list[MethodRun] = []
    for label in labels:
        name, *settings = label.split("@")
        spec = get_spec(name.strip())
        raw = dict(method_options.get(spec.name, {}))
        for item in settings:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UserError(f"bad method variant {label!r}: write METHOD@KEY=VALUE[@KEY=VALUE...]")
            raw[key.strip()] = value.strip()
        runs.append(MethodRun(label, spec.name, parse_options(spec.options, raw, where=spec.name)))
    return runs


# With no --methods (a first run), every ready method runs beside vanilla, sized so that a
# 2-core CPU finishes in about three minutes: these apply only where the user gave no value.
QUICK_LIMIT = 6
QUICK_MAX_NEW_TOKENS = 64
DEFAULT_MAX_NEW_TOKENS = 128


def ready_methods(model: str, method_options: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Every registered method whose weights are shipped for ``model`` or given by ``--method-option``.

    A first run should answer "which method is fastest here", so it compares everything that can
    run without training; a method whose ``check_ready`` refuses is left out, not an error.
    """
    from methods.registry import available_methods

    ready = []
    for name in available_methods():
        spec = get_spec(name)
        # a bad --method-option value is the user's error to see, not a reason to drop the method
        options = parse_options(spec.options, dict((method_options or {}).get(name, {})), where=name)
        try:
            spec.decoder.check_ready(model, options)
        except UserError:
            continue
        ready.append(name)
    return [BASELINE, *(m for m in ready if m != BASELINE)]


@dataclass
class RunConfig:
    methods: list[str] = field(default_factory=lambda: ["vanilla"])
    tasks: list[str] = field(default_factory=lambda: ["builtin"])
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 128
    limit: int | None = None
    seed: int = 0
    warmup: int = 1
    data_dir: str | None = None
    task_paths: dict[str, str] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    temperature: float = 0.0
    top_p: float = 1.0
    baseline: bool = True   # run vanilla beside any other method (the reference for speedup and losslessness)
    out: str | None = None
    overwrite: bool = False
    report: bool = True
    chosen_methods: bool = False  # the methods were picked by ready_methods (no --methods): say so

    def method_labels(self) -> list[str]:
        labels = list(self.methods)
        if self.baseline and BASELINE not in labels and any(m != BASELINE for m in labels):
            labels.insert(0, BASELINE)
        return labels

    def identity(self) -> dict[str, Any]:
        """What decides the examples and their meaning; a resumed run must match it.

        Methods are not part of it: adding a method or a variant to a finished run resumes it.
        """
        keep = ("tasks", "model", "device", "dtype", "max_new_tokens", "limit", "seed", "task_options",
                "temperature", "top_p")
        return {k: getattr(self, k) for k in keep}

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]


def validate(config: RunConfig) -> list[MethodRun]:
    if config.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be a positive integer, got {config.max_new_tokens}")
    if config.limit is not None and config.limit <= 0:
        raise UserError(f"--limit must be a positive integer, got {config.limit}")
    if not config.methods:
        raise UserError("no methods given; pass --methods vanilla,... (see `python -m harness list`)")
    if len(set(config.methods)) != len(config.methods):
        raise UserError(f"--methods lists a method twice: {','.join(config.methods)}")
    if not config.temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {config.temperature}")
    if not 0 < config.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {config.top_p}")
    runs = parse_method_runs(config.method_labels(), config.method_options)
    named = {r.name for r in runs}
    for method in config.method_options:
        if method not in named:
            get_spec(method)  # an unknown method name says so first
            raise UserError(f"--method-option given for {method!r}, which is not in --methods "
                            f"({','.join(config.methods)}); add it or drop the option")
    from harness.models import DTYPES, check_model_name, resolve_device

    check_model_name(config.model)
    resolve_device(config.device)  # fail fast on CUDA-less machines, before loading anything
    if config.dtype not in (*DTYPES, "auto"):
        raise UserError(f"unknown dtype {config.dtype!r}; valid dtypes: {', '.join([*DTYPES, 'auto'])}")
    return runs


def load_examples(config: RunConfig) -> tuple[list[Example], dict[str, dict[str, Any]]]:
    options = TaskOptions(
        data_dir=Path(config.data_dir) if config.data_dir else None,
        paths={k: Path(v) for k, v in config.task_paths.items()},
        limit=config.limit,
        seed=config.seed,
        extra=config.task_options,
    )
    examples: list[Example] = []
    info: dict[str, dict[str, Any]] = {}
    for spec in config.tasks:
        chosen = load_task(spec, options)
        name, _ = split_spec(spec)
        # Examples carry the full spec as their task so categories selections stay apart.
        chosen = [Example(e.id, e.category, e.turns, e.reference, e.source, spec) for e in chosen]
        examples.extend(chosen)
        info[spec] = {"suite": name, "hash": task_hash(chosen), "examples": len(chosen),
                      "source": chosen[0].source}
    return examples, info


def default_out_dir(config: RunConfig) -> Path:
    slug = Path(config.model).name.replace(" ", "_") or "model"
    return Path("runs") / f"{slug}-{config.dtype}-{config.identity_hash()}"


def prepare_out_dir(config: RunConfig, out: Path, task_info: dict[str, dict[str, Any]],
                    runs: list[MethodRun]) -> tuple[set[tuple[str, str, str]], dict[str, Any]]:
    """Create or reopen the run folder; return the keys already done (resume) and the old manifest."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out}: {exc.strerror}; choose another --out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable; choose another --out")
    manifest_path = out / MANIFEST_FILE
    results_path = out / RESULTS_FILE
    if config.overwrite:
        for p in (manifest_path, results_path):
            p.unlink(missing_ok=True)
        return set(), {}
    old: dict[str, Any] = {}
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{manifest_path} is unreadable or corrupt; pass --overwrite to start afresh") from None
        if old.get("config", {}).get("identity") != config.identity():
            diff = sorted(k for k, v in config.identity().items()
                          if old.get("config", {}).get("identity", {}).get(k) != v)
            raise UserError(
                f"{out} holds results of a different configuration (differs in: {', '.join(diff)}); "
                "use another --out, or --overwrite to discard them"
            )
        old_hashes = {k: v.get("hash") for k, v in old.get("tasks", {}).items()}
        if old_hashes and old_hashes != {k: v["hash"] for k, v in task_info.items()}:
            raise UserError(
                f"{out} holds results for different examples (task hash changed: the data files differ); "
                "use another --out, or --overwrite to discard them"
            )
        for run in runs:
            before = old.get("method_options", {}).get(run.label)
            if before is not None and before != _jsonable(run.options_dict()):
                diff = sorted(k for k, v in _jsonable(run.options_dict()).items() if before.get(k) != v)
                raise UserError(
                    f"{out} holds {run.label!r} results made with other options (differs in: {', '.join(diff)}); "
                    f"name the new setting as a variant (e.g. {run.name}@{diff[0]}=...), use another --out, "
                    "or --overwrite to discard them")
    elif results_path.exists():
        raise UserError(f"{out} has {RESULTS_FILE} but no {MANIFEST_FILE}; use another --out or --overwrite")
    return {record_key(r) for r in read_records(results_path, repair=True)}, old


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def execute(config: RunConfig) -> Path:
    """Run the benchmark described by ``config``; returns the run folder."""
    runs = validate(config)
    examples, task_info = load_examples(config)
    out = Path(config.out) if config.out else default_out_dir(config)
    done, old_manifest = prepare_out_dir(config, out, task_info, runs)

    from harness.environment import environment
    from harness.models import load_model
    from harness.runner import ShardSettings, run_shard, warm_up
    from methods.core.engine import Engine
    from methods.core.prompts import stop_token_ids

    for run in runs:
        get_spec(run.name).decoder.check_ready(config.model, run.options)
    model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
    engine = Engine(model)
    decoders = []
    for run in runs:
        decoder = get_spec(run.name).decoder(engine, run.options, model_name=config.model)
        decoder.label = run.label
        decoders.append(decoder)
    settings = ShardSettings(
        max_new_tokens=config.max_new_tokens,
        stop_ids=stop_token_ids(tokenizer, model),
        max_context=getattr(model.config, "max_position_embeddings", None),
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
    )
    labels = list(dict.fromkeys([*old_manifest.get("config", {}).get("methods", []), *(r.label for r in runs)]))
    manifest = {
        "config": {**asdict(config), "methods": labels, "identity": config.identity()},
        "model": {"name": config.model, "type": model.config.model_type,
                  "layers": model.config.num_hidden_layers,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())},
        "dtype": str(engine.dtype).removeprefix("torch."),
        "tasks": task_info,
        "methods": {**old_manifest.get("methods", {}), **{d.label: d.describe() for d in decoders}},
        "method_options": {**old_manifest.get("method_options", {}),
                           **{r.label: _jsonable(r.options_dict()) for r in runs}},
        "environment": environment(engine.device),
        "started": old_manifest.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "running",
    }
    write_manifest(out, manifest)

    if config.chosen_methods:
        print(f"No --methods given: comparing every method ready for {config.model}: "
              f"{', '.join(r.label for r in runs)} ({config.limit} examples per task, {config.max_new_tokens} "
              "new tokens; --methods, --limit and --max-new-tokens choose otherwise)", file=sys.stderr)
    todo = len(examples) * len(decoders)
    already = sum(1 for e in examples for d in decoders if (e.task, e.id, d.label) in done)
    print(f"Run folder: {out}  ({len(examples)} examples x {len(decoders)} methods, "
          f"{already} already done)", file=sys.stderr)
    from tqdm import tqdm

    completed = already
    try:
        if completed < todo:
            warm_up(decoders, examples[0], tokenizer, settings, config.warmup)
        with ResultsWriter(out / RESULTS_FILE) as writer, tqdm(
            total=todo, initial=0, desc="decoding", unit="gen", file=sys.stderr, dynamic_ncols=True
        ) as bar:
            def emit(record: dict[str, Any]) -> None:
                nonlocal completed
                writer.write(record)
                completed += 1

            run_shard(examples, decoders, tokenizer, settings, emit, done, on_progress=bar.update)
    except KeyboardInterrupt:
        manifest["status"] = "interrupted"
        write_manifest(out, manifest)
        print(f"\nInterrupted: {completed} of {todo} generations are saved in {out / RESULTS_FILE}; "
              "rerun the same command to finish the rest.", file=sys.stderr)
        raise SystemExit(130) from None
    from harness.divergence import find_divergences

    divergences = find_divergences(read_records(out / RESULTS_FILE), examples, engine, tokenizer)
    (out / DIVERGENCES_FILE).write_text("".join(json.dumps(d) + "\n" for d in divergences))
    manifest["status"] = "complete"
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_manifest(out, manifest)
    return out
