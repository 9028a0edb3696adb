"""The ``run`` command end to end: validate, load tasks and model, resume, run, summarise.

All validation that can fail on user input happens *before* the model loads, so a typo
costs a second, not a model load.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
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
    load_manifest_file,
    WriterLock,
    read_records,
    record_key,
    shard_name,
    shards_in,
    write_manifest,
)
from methods.core.options import parse_options
from methods.registry import get_spec
from tasks.base import Example, TaskOptions, check_task_settings, load_task, split_spec, task_hash

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
    repeats: int = 1        # timed rounds per (example, method), the median kept (harness.runner)
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
    # How the work is spread; none of it changes what a record means, so none is in identity().
    shard: tuple[int, int] | None = None   # (I, N): this process runs the I-th of N deterministic parts
    executor: str = "local"                # "local" (this process) or "ray" (actors, this process writes)
    ray_address: str | None = None
    workers: int | None = None             # Ray actors (default: the cluster's GPUs / --gpus-per-worker, or CPUs)
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None  # torch threads per actor (default: this machine's cores // workers)
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
        identity = {k: getattr(self, k) for k in keep}
        if self.repeats != 1:  # a median of rounds is another measurement; absent at 1, so older runs still resume
            identity["repeats"] = self.repeats
        return identity

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
    check_task_settings(config.tasks, config.task_options, config.task_paths)
    if config.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {config.warmup}")
    if config.repeats < 1:
        raise UserError(f"--repeats must be a positive integer, got {config.repeats}")
    if config.executor not in ("local", "ray"):
        raise UserError(f"unknown --executor {config.executor!r}; valid executors: local, ray")
    if config.executor != "ray":
        given = [flag for flag, value in (("--ray-address", config.ray_address), ("--workers", config.workers),
                                          ("--gpus-per-worker", config.gpus_per_worker or None),
                                          ("--threads-per-worker", config.threads_per_worker)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply with --executor ray")
    if config.workers is not None and config.workers < 1:
        raise UserError(f"--workers must be a positive integer, got {config.workers}")
    if config.threads_per_worker is not None and config.threads_per_worker < 1:
        raise UserError(f"--threads-per-worker must be a positive integer, got {config.threads_per_worker}")
    if not config.gpus_per_worker >= 0:
        raise UserError(f"--gpus-per-worker must be >= 0, got {config.gpus_per_worker}")
    runs = parse_method_runs(config.method_labels(), config.method_options)
    named = {r.name for r in runs}
    for method in config.method_options:
        if method not in named:
            get_spec(method)  # an unknown method name says so first
            raise UserError(f"--method-option given for {method!r}, which is not in --methods "
                            f"({','.join(config.methods)}); add it or drop the option")
    from harness.models import DTYPES, check_model_name, resolve_device

    check_model_name(config.model)
    if config.executor != "ray":  # Ray workers may have the GPUs this driver lacks
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
    owner: dict[tuple[str, str], str] = {}  # (source, id) -> the --tasks entry that selected it
    for spec in config.tasks:
        chosen = load_task(spec, options)
        name, _ = split_spec(spec)
        for e in chosen:
            other = owner.setdefault((e.source, e.id), spec)
            if other != spec:
                raise UserError(f"--tasks entries {other!r} and {spec!r} both select example {e.id}; an example "
                                "must be counted once: merge them into one entry")
        # Examples carry the full spec as their task so categories selections stay apart.
        chosen = [Example(e.id, e.category, e.turns, e.reference, e.source, spec) for e in chosen]
        examples.extend(chosen)
        info[spec] = {"suite": name, "hash": task_hash(chosen), "examples": len(chosen),
                      "source": chosen[0].source}
    return examples, info


def check_fits_context(config: RunConfig, examples: list[Example]) -> None:
    """Refuse, before the weights load, a run in which no generation could happen.

    The context length comes from the model's config and prompt lengths from its tokenizer,
    both read in about a second; otherwise every example would be skipped and the run would
    end "successfully" with nothing done.
    """
    from harness.models import context_length, load_tokenizer, model_config
    from methods.core.prompts import encode_conversation

    context = context_length(model_config(config.model))
    if context is None:
        return
    if config.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {config.max_new_tokens} does not fit the model's context of {context} "
                        f"tokens (prompt included); use at most {context - 1}, well below it to leave room for prompts")
    tokenizer = load_tokenizer(config.model)
    shortest = min(len(encode_conversation(tokenizer, [{"role": "user", "content": e.turns[0]}])) for e in examples)
    if shortest + config.max_new_tokens > context:
        raise UserError(f"every prompt is too long for the model's context of {context} tokens: the shortest is "
                        f"{shortest} tokens + {config.max_new_tokens} new; lower --max-new-tokens to at most "
                        f"{max(context - shortest, 0)} or use shorter prompts (e.g. --task-option xsum.max_words=N)")


def shard_examples(examples: list[Example], shard: tuple[int, int] | None) -> list[Example]:
    """The I-th of N parts: every N-th example of the selection, starting at the I-th.

    The selection itself (``--limit`` sampling included) is seeded, so every shard process
    computes the same list and the parts are disjoint and cover it; the task hash, over the
    whole selection, is what shards are checked to share.
    """
    if shard is None:
        return examples
    index, count = shard
    return examples[index - 1::count]


def default_out_dir(config: RunConfig) -> Path:
    slug = Path(config.model).name.replace(" ", "_") or "model"
    return Path("runs") / f"{slug}-{config.dtype}-{config.identity_hash()}"


def prepare_out_dir(config: RunConfig, out: Path, task_info: dict[str, dict[str, Any]],
                    runs: list[MethodRun]) -> tuple[set[tuple[str, str, str]], dict[str, Any]]:
    """Reopen the run folder (made by ``make_out_dir``, locked by the caller); return the keys already done
    (resume) and this shard's old manifest. Other shards' manifests in the folder are checked too, so a
    shard started with another configuration is refused before it decodes anything."""
    manifest_path = out / shard_name(MANIFEST_FILE, config.shard)
    results_path = out / shard_name(RESULTS_FILE, config.shard)
    if config.overwrite:
        for p in (manifest_path, results_path, out / shard_name(DIVERGENCES_FILE, config.shard)):
            p.unlink(missing_ok=True)
    others = [s for s in shards_in(out) if s != config.shard]
    if config.shard is None and others:
        raise UserError(f"{out} holds a sharded run (--shard I/{others[0][1]}); add --shard, or use another --out")
    if config.shard is not None:
        if (out / MANIFEST_FILE).exists() or (out / RESULTS_FILE).exists():
            raise UserError(f"{out} holds an unsharded run; run the shards in another --out")
        if any(n != config.shard[1] for _, n in others):
            raise UserError(f"{out} holds shards of another split (--shard I/{others[0][1]}); use that N, "
                            "or another --out")
    if config.overwrite:
        manifest_paths = []
    else:
        manifest_paths = [manifest_path] if manifest_path.exists() else []
    manifest_paths += [out / shard_name(MANIFEST_FILE, s) for s in others
                       if (out / shard_name(MANIFEST_FILE, s)).exists()]
    old: dict[str, Any] = {}
    for path in manifest_paths:
        found = load_manifest_file(path)
        _check_compatible(config, out, path, found, task_info, runs)
        if path == manifest_path:
            old = found
    if not manifest_path.exists() and results_path.exists():
        raise UserError(f"{out} has {results_path.name} but no {manifest_path.name}; use another --out or --overwrite")
    return {record_key(r) for r in read_records(results_path, repair=True)}, old


def _check_compatible(config: RunConfig, out: Path, path: Path, old: dict[str, Any],
                      task_info: dict[str, dict[str, Any]], runs: list[MethodRun]) -> None:
    """A manifest already in the folder must describe the same examples and the same method options."""
    if path.name != MANIFEST_FILE:
        out = path  # name the shard's manifest: the folder is fine, one shard in it is not
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


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out}: {exc.strerror}; choose another --out") from None
    try:  # a real probe: os.access says yes to root even where writes fail (read-only mounts, /proc)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise UserError(f"output directory {out} is not writable ({exc.strerror}); choose another --out") from None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


@dataclass
class Workbench:
    """Everything that decodes: the model loaded once, one decoder per method row, the shared settings.

    Built by ``execute`` in this process, or by each Ray actor in its own (``harness/ray_executor.py``).
    """

    model: Any
    tokenizer: Any
    engine: Any
    decoders: list[Any]
    settings: Any

    def describe(self) -> dict[str, Any]:
        """The manifest's model, dtype, methods and environment entries, as measured where decoding runs."""
        from harness.environment import environment
        from methods.core.hardware import kv_bytes_per_token, step_weight_bytes

        model = self.model
        return {
            "model": {"type": model.config.model_type, "layers": model.config.num_hidden_layers,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "step_weight_bytes": step_weight_bytes(model), "kv_bytes_per_token": kv_bytes_per_token(model)},
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "methods": {d.label: d.describe() for d in self.decoders},
            "environment": environment(self.engine.device),
        }


CONTEXT_RULE = "median prompt tokens (first turn, up to 64 examples) + half of max_new_tokens"


def decode_limit(config: RunConfig, examples: list[Example], model: dict[str, Any], env: dict[str, Any],
                 tokenizer: Any = None) -> dict[str, Any] | None:
    """The bytes a vanilla step reads at a representative context and the fastest such a step
    can be at the machine's read bandwidth (``methods/core/hardware.py``): the report holds
    the baseline's measured step against it. None where the description lacks either figure."""
    from statistics import median

    from harness.models import load_tokenizer
    from methods.core.hardware import step_limit_ms
    from methods.core.prompts import encode_conversation

    gbs = env.get("read_bandwidth_gbs")
    if not gbs or model.get("step_weight_bytes") is None or not examples:
        return None
    tokenizer = tokenizer or load_tokenizer(config.model)
    prompt = int(median(len(encode_conversation(tokenizer, [{"role": "user", "content": e.turns[0]}]))
                        for e in examples[:64]))
    context = prompt + config.max_new_tokens // 2
    step = model["step_weight_bytes"] + model["kv_bytes_per_token"] * context
    return {"context": context, "context_rule": CONTEXT_RULE, "step_bytes": step, "read_bandwidth_gbs": gbs,
            "step_limit_ms": round(step_limit_ms(step, gbs), 3)}


def build_workbench(config: RunConfig, runs: list[MethodRun]) -> Workbench:
    from harness.models import load_model
    from harness.runner import ShardSettings
    from methods.core.engine import Engine
    from methods.core.prompts import stop_token_ids

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
        repeats=config.repeats,
    )
    return Workbench(model, tokenizer, engine, decoders, settings)


def execute(config: RunConfig) -> Path:
    """Run the benchmark described by ``config``; returns the run folder.

    The results file is locked before anything is read from it, and stays locked to the end:
    what is done, and so what is left, cannot change under this process.
    """
    runs = validate(config)
    examples, task_info = load_examples(config)
    for run in runs:
        get_spec(run.name).decoder.check_ready(config.model, run.options)
    check_fits_context(config, examples)
    out = Path(config.out) if config.out else default_out_dir(config)
    make_out_dir(out)
    results_path = out / shard_name(RESULTS_FILE, config.shard)
    with WriterLock(results_path):
        return _execute_locked(config, runs, shard_examples(examples, config.shard), task_info, out, results_path)


def _execute_locked(config: RunConfig, runs: list[MethodRun], examples: list[Example],
                    task_info: dict[str, dict[str, Any]], out: Path, results_path: Path) -> Path:
    done, old_manifest = prepare_out_dir(config, out, task_info, runs)
    manifest_name = shard_name(MANIFEST_FILE, config.shard)

    ray_pool = bench = None
    if config.executor == "ray":
        from harness.ray_executor import RayExecutor

        ray_pool = RayExecutor(config, runs)
        described = ray_pool.describe()
    else:
        bench = build_workbench(config, runs)
        described = bench.describe()
    try:
        labels = list(dict.fromkeys([*old_manifest.get("config", {}).get("methods", []), *(r.label for r in runs)]))
        manifest = {
            "config": {**asdict(config), "methods": labels, "identity": config.identity()},
            "model": {"name": config.model, **described["model"]},
            "dtype": described["dtype"],
            "tasks": task_info,
            "methods": {**old_manifest.get("methods", {}), **described["methods"]},
            "method_options": {**old_manifest.get("method_options", {}),
                               **{r.label: _jsonable(r.options_dict()) for r in runs}},
            "environment": described["environment"],
            "decode_limit": decode_limit(config, examples, described["model"], described["environment"],
                                         bench.tokenizer if bench else None),
            **({"executor": ray_pool.summary()} if ray_pool else {}),
            "started": old_manifest.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
        }
        write_manifest(out, manifest, manifest_name)

        n_methods = len(runs)
        todo = len(examples) * n_methods
        already = sum(1 for e in examples for r in runs if (e.task, e.id, r.label) in done)
        part = f", shard {config.shard[0]}/{config.shard[1]}" if config.shard else ""
        where = f", {ray_pool.workers} Ray workers" if ray_pool else ""
        if config.chosen_methods:
            print(f"No --methods given: comparing every method ready for {config.model}: "
                  f"{', '.join(r.label for r in runs)} ({config.limit} examples per task, {config.max_new_tokens} "
                  "new tokens; --methods, --limit and --max-new-tokens choose otherwise)", file=sys.stderr)
        print(f"Run folder: {out}  ({len(examples)} examples x {n_methods} methods{part}{where}, "
              f"{already} already done)", file=sys.stderr)
        from tqdm import tqdm

        from harness.runner import run_shard, warm_up

        completed = already
        try:
            with ResultsWriter(results_path, locked=True) as writer, tqdm(
                total=todo, initial=0, desc="decoding", unit="gen", file=sys.stderr, dynamic_ncols=True
            ) as bar:
                def emit(record: dict[str, Any]) -> None:
                    nonlocal completed
                    writer.write(record)
                    completed += 1

                if ray_pool is not None:
                    ray_pool.run(examples, done, emit, on_progress=bar.update)
                else:
                    if completed < todo:
                        warm_up(bench.decoders, examples[0], bench.tokenizer, bench.settings, config.warmup)
                    run_shard(examples, bench.decoders, bench.tokenizer, bench.settings, emit, done,
                              on_progress=bar.update)
        except KeyboardInterrupt:
            manifest["status"] = "interrupted"
            write_manifest(out, manifest, manifest_name)
            print(f"\nInterrupted: {completed} of {todo} generations are saved in {results_path}; "
                  "rerun the same command to finish the rest.", file=sys.stderr)
            raise SystemExit(130) from None

        records = read_records(results_path)
        if ray_pool is not None:
            divergences = ray_pool.divergences(records, examples)
        else:
            from harness.divergence import find_divergences

            divergences = find_divergences(records, examples, bench.engine, bench.tokenizer)
    finally:
        if ray_pool is not None:
            ray_pool.close()
    (out / shard_name(DIVERGENCES_FILE, config.shard)).write_text("".join(json.dumps(d) + "\n" for d in divergences))
    manifest["status"] = "complete"
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_manifest(out, manifest, manifest_name)
    return out
