"""A run's configuration: every default once, every value validated once, before anything loads.

``RunConfig`` is what the ``run`` command was asked; the CLI takes its defaults from here,
``validate`` checks each value once and returns the parsed method rows, and ``decode_spec``
is the part a decoding process (this one, or a Ray actor) needs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from base.errors import UserError
from base.options import parse_options
from methods.registry import get_spec
from tasks.base import check_task_settings

BASELINE = "vanilla"

# With no --methods (a first run), every ready method runs beside vanilla, sized so that a
# 2-core CPU finishes in about three minutes: these apply only where the user gave no value.
QUICK_LIMIT = 6
QUICK_MAX_NEW_TOKENS = 64
DEFAULT_MAX_NEW_TOKENS = 128
EXECUTORS = ("local", "ray")


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
    variant of their method, a variant's own settings (a preset included) override them, option by
    option under either of its names (``eagle@top_k=10`` over ``eagle.topk=4``). All checked before
    the model loads."""
    runs: list[MethodRun] = []
    for label in labels:
        name, *settings = label.split("@")
        spec = get_spec(name.strip())
        variant: dict[str, str] = {}
        for item in settings:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UserError(f"bad method variant {label!r}: write METHOD@KEY=VALUE[@KEY=VALUE...]")
            variant[key.strip()] = value.strip()
        options = parse_options(spec.options, method_options.get(spec.name, {}), variant, where=spec.name)
        runs.append(MethodRun(label, spec.name, options))
    return runs


def complete_options(label: str, recorded: dict[str, Any]) -> dict[str, Any]:
    """A method's recorded options with the ones added since filled in as they would have read then.

    A manifest or baseline written before an option existed (``self_spec.rule``,
    ``lookahead.init``) lacks its key; that run ran what the option's default (under the other
    recorded values) runs now, so comparing records by their keys alone would call old runs and
    baselines different from new ones made with the same settings. Keys already recorded are
    kept as they are; a record this code cannot parse (an unknown method, an option since
    removed) is returned unchanged, to compare as it is.
    """
    try:
        spec = get_spec(label.split("@")[0].strip())
        parsed = asdict(parse_options(spec.options, recorded, where=spec.name))
    except (UserError, TypeError, ValueError):
        return recorded
    missing = {k: v for k, v in parsed.items() if k not in recorded}
    return {**recorded, **json.loads(json.dumps(missing))} if missing else recorded


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


@dataclass(frozen=True)
class DecodeSpec:
    """What a decoding process needs to build its workbench and decode: no more of the run's configuration."""

    model: str
    device: str
    dtype: str
    runs: tuple[MethodRun, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    repeats: int
    warmup: int
    costs: dict[str, Any] | None = None  # a cost record to use instead of measuring (``--costs-from``)
    concurrency: tuple[int, ...] | None = None  # requests in flight, one measurement per level; None: one at a time
    request_rate: float | None = None  # open loop: seeded Poisson arrivals per second; None: closed loop


@dataclass
class RunConfig:
    methods: list[str] = field(default_factory=lambda: [BASELINE])
    tasks: list[str] = field(default_factory=lambda: ["builtin"])
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
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
    costs_from: str | None = None  # a baseline, a manifest or a run folder whose measured costs to replay
    # Load: None is one request at a time. Each level of ``concurrency`` is its own measurement
    # with that many requests in flight; ``request_rate`` turns the closed loop (a new request as
    # soon as one finishes) into an open one (seeded Poisson arrivals at R per second, at most
    # the level in flight).
    concurrency: list[int] | None = None
    request_rate: float | None = None

    @classmethod
    def first_run_or_given(cls, methods: list[str] | None, limit: int | None, max_new_tokens: int | None,
                           **given: Any) -> RunConfig:
        """No ``methods`` (a first run): every ready method, quickly (``QUICK_*`` where no value is given);
        otherwise the given methods with the usual defaults."""
        chosen = methods is None
        if chosen:
            methods = ready_methods(given.get("model", cls.model), given.get("method_options"))
            limit = QUICK_LIMIT if limit is None else limit
            max_new_tokens = QUICK_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        elif max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        return cls(methods=methods, limit=limit, max_new_tokens=max_new_tokens, chosen_methods=chosen, **given)

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
        # Under load a step batches several requests: another measurement. Absent when not given,
        # so runs made one request at a time keep their identity and still resume.
        if self.concurrency is not None:
            identity["concurrency"] = list(self.concurrency)
        if self.request_rate is not None:
            identity["request_rate"] = self.request_rate
        costs = self.pinned_costs()
        if costs is not None:  # replayed costs decide what the fitted methods draft
            identity["pinned_costs"] = hashlib.sha256(json.dumps(costs, sort_keys=True).encode()).hexdigest()[:8]
        return identity

    def pinned_costs(self) -> dict[str, Any] | None:
        """The cost record ``--costs-from`` names (``methods.core.cost.recording_costs``), or None."""
        if self.costs_from is None:
            return None
        from pathlib import Path

        from base.files import read_json
        from methods.core.cost import check_cost_record

        path = Path(self.costs_from)
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            raise UserError(f"--costs-from {self.costs_from}: no such file (give a baseline JSON, a run's "
                            "manifest.json or its run folder)")
        data = read_json(path, "give a baseline JSON, a run's manifest.json or its run folder", expect=None)
        record = data.get("costs") if isinstance(data, dict) else None
        if isinstance(record, dict):
            record = {"curve": record.get("curve"), "calls": record.get("calls", {})}
        return check_cost_record(record, f"--costs-from {self.costs_from}")

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]

    def decode_spec(self, runs: list[MethodRun]) -> DecodeSpec:
        return DecodeSpec(self.model, self.device, self.dtype, tuple(runs), self.max_new_tokens, self.temperature,
                          self.top_p, self.seed, self.repeats, self.warmup, self.pinned_costs(),
                          concurrency=tuple(self.concurrency) if self.concurrency is not None else None,
                          request_rate=self.request_rate)


CONCURRENCY_SHAPE = "--concurrency takes positive integers like 1,4,16"


def parse_concurrency(text: str) -> list[int]:
    """``--concurrency 1,4,16`` as its levels. A non-integer is refused here, in the same words as
    ``check_load`` uses for a level below 1, so every bad ``--concurrency`` reads alike."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise UserError(f"{CONCURRENCY_SHAPE}, got {text!r}") from None


def check_load(config: RunConfig, runs: list[MethodRun]) -> None:
    """``--concurrency`` and ``--request-rate``, and that every method of the run can decode batched.

    A method whose drafting cannot yet run in the batched loop says so (``Decoder.batchable``);
    refusing it here costs a second, where finding out in the engine would cost a model load.
    """
    if config.request_rate is not None:
        rate = config.request_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
            raise UserError(f"--request-rate must be a positive finite number of requests per second, got {rate}")
        if config.concurrency is None:
            raise UserError("--request-rate needs --concurrency, the most requests in flight (e.g. --concurrency 16)")
    if config.concurrency is None:
        return
    levels = config.concurrency
    if not levels or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in levels):
        raise UserError(f"{CONCURRENCY_SHAPE}, got {','.join(map(str, levels)) or 'nothing'}")
    repeated = sorted({n for n in levels if levels.count(n) > 1})
    if repeated:
        raise UserError(f"--concurrency lists level {','.join(map(str, repeated))} more than once "
                        f"({','.join(map(str, levels))}); give each level once")
    if config.repeats != 1:
        raise UserError(f"--repeats {config.repeats} is not supported under load (--concurrency); "
                        "drop --repeats or --concurrency")
    refused = list(dict.fromkeys(r.name for r in runs if not get_spec(r.name).decoder.batchable))
    if refused:
        from methods.registry import available_methods

        can = [m for m in available_methods() if get_spec(m).decoder.batchable]
        raise UserError(f"--concurrency: {', '.join(refused)} cannot decode batched yet; drop --concurrency or "
                        f"use methods that can: {', '.join(can) or 'none'}")


def validate(config: RunConfig) -> list[MethodRun]:
    """Every value of ``config`` checked, once, before anything loads; returns the parsed method rows."""
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
    if config.executor not in EXECUTORS:
        raise UserError(f"unknown --executor {config.executor!r}; valid executors: {', '.join(EXECUTORS)}")
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
    check_load(config, runs)
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
    config.pinned_costs()
    return runs
