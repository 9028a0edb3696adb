"""Examples, the task registry, deterministic selection and the content hash.

Every method must see exactly the same examples, so selection is a pure function of
(suite, source file, --limit, --seed) and every run records a hash of the examples it
actually used; reports and checks refuse to compare runs whose hashes differ.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from base.errors import UserError
from base.options import NoOptions, describe_options, parse_options


@dataclass(frozen=True)
class Example:
    """One benchmark item. ``turns`` are user messages; later turns follow the model's own answers."""

    id: str
    category: str
    turns: tuple[str, ...]
    reference: str | None = None
    source: str = ""
    task: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["turns"] = list(self.turns)
        return data


@dataclass
class TaskOptions:
    """Where and how much to load; shared by every suite."""

    data_dir: Path | None = None
    paths: dict[str, Path] = field(default_factory=dict)  # suite -> explicit file
    limit: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # suite-specific (jsonl field names, ...)


# name -> module that registers it; imported only when the suite is used.
BUILTIN_TASKS: dict[str, str] = {
    "builtin": "tasks.builtin",
    "xsum": "tasks.xsum",
    "gsm8k": "tasks.gsm8k",
    "mt_bench": "tasks.mt_bench",
    "spec_bench": "tasks.spec_bench",
    "jsonl": "tasks.jsonl",
}

Loader = Callable[[str | None, TaskOptions], list[Example]]


@dataclass(frozen=True)
class TaskInfo:
    loader: Loader
    description: str
    argument: str  # what ``suite:ARG`` means: "categories" (filter), "path", or "none"
    options: type = NoOptions  # typed ``--task-option suite.KEY=VALUE`` settings (a dataclass)
    data_file: str | None = None  # the file ``--task-path suite=FILE`` / ``--data-dir`` stand in for


_REGISTRY: dict[str, TaskInfo] = {}


def register_task(name: str, description: str, argument: str = "categories", *, options: type = NoOptions,
                  data_file: str | None = None):
    """Register ``loader(argument, options) -> examples`` under ``name`` (``--tasks name[:argument]``).

    With ``argument="categories"`` the loader returns every example and ``load_task``
    applies ``name:cat1+cat2`` itself, so every suite filters and reports alike. ``options``
    declares the suite's ``--task-option`` keys, so a misspelt key is an error, not ignored.
    """

    def wrap(fn: Loader) -> Loader:
        _REGISTRY[name] = TaskInfo(fn, description, argument, options, data_file)
        return fn

    return wrap


def task_info(name: str) -> TaskInfo:
    _ensure_imported(name)
    return _REGISTRY[name]


def suite_options(name: str, options: TaskOptions) -> Any:
    """The suite's typed options from ``--task-option name.KEY=VALUE`` (defaults for the rest)."""
    prefix = f"{name}."
    raw = {k[len(prefix):]: v for k, v in options.extra.items() if k.startswith(prefix)}
    return parse_options(task_info(name).options, raw, where=name)


def check_task_settings(specs: Sequence[str], extra: Mapping[str, Any], paths: Mapping[str, Any]) -> None:
    """Every ``--task-option`` and ``--task-path`` must name a suite of the run and a key it has.

    An ignored typo (``jsonl.promt=q``) would silently run the default and still be
    written into the manifest as if it had applied.
    """
    if not specs:
        raise UserError("no tasks given; pass --tasks builtin (or another suite; see `python -m harness list`)")
    in_run = {split_spec(s)[0] for s in specs}
    for name in sorted(in_run):
        _ensure_imported(name)
    seen: dict[Any, str] = {}
    for spec in specs:
        key = _normal_spec(spec)
        if key in seen:
            also = "" if seen[key] == spec else f" (also as {seen[key]!r})"
            raise UserError(f"--tasks names {spec!r} twice{also}; list each task once")
        seen[key] = spec
    for key in extra:
        suite, sep, option_name = key.partition(".")
        if not sep or not option_name:
            raise UserError(f"--task-option expects SUITE.KEY=VALUE (e.g. jsonl.prompt=question), got {key!r}")
        _ensure_imported(suite)
        if suite not in in_run:
            raise UserError(f"--task-option {key} is for task {suite!r}, which is not in --tasks "
                            f"({','.join(specs)}); add it or drop the option")
    for name in sorted(in_run):
        suite_options(name, TaskOptions(extra=dict(extra)))
    for suite in paths:
        info = task_info(suite)
        if info.data_file is None:
            hint = f"use --tasks {suite}:PATH" if info.argument == "path" else "it reads no data file"
            raise UserError(f"--task-path {suite}=... does not apply to task {suite!r}: {hint}")
        if suite not in in_run:
            raise UserError(f"--task-path {suite}=... is for task {suite!r}, which is not in --tasks "
                            f"({','.join(specs)}); add it or drop the flag")


def _normal_spec(spec: str) -> tuple[str, Any]:
    name, arg = split_spec(spec)
    if arg is None:
        return name, None
    if name in _REGISTRY and _REGISTRY[name].argument == "categories":
        return name, tuple(sorted({c.strip() for c in arg.split(",") if c.strip()}))
    if name in _REGISTRY and _REGISTRY[name].argument == "path":
        return name, str(Path(arg).expanduser().resolve())
    return name, arg


def check_unique_ids(items: Iterable[tuple[Any, str]], where: str, hint: str) -> None:
    """``(line, id)`` pairs: two examples with one id would share a results key and pair wrongly."""
    first: dict[str, Any] = {}
    for line, example_id in items:
        if example_id in first:
            raise UserError(f"{where}: lines {first[example_id]} and {line} both have id {example_id!r}; "
                            f"example ids must be unique ({hint})")
        first[example_id] = line


def describe_task_options(name: str) -> list[str]:
    return describe_options(task_info(name).options)


def available_tasks() -> list[str]:
    return sorted(set(BUILTIN_TASKS) | set(_REGISTRY))


def describe_task(name: str) -> str:
    _ensure_imported(name)
    return _REGISTRY[name].description


def _ensure_imported(name: str) -> None:
    if name not in _REGISTRY:
        module = BUILTIN_TASKS.get(name)
        if module is None:
            raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(available_tasks())}")
        importlib.import_module(module)


CATEGORY_SEP = "+"


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"spec_bench:math+coding"`` -> ``("spec_bench", "math+coding")``."""
    name, sep, arg = spec.partition(":")
    return name.strip(), (arg.strip() if sep else None)


def load_task(spec: str, options: TaskOptions) -> list[Example]:
    """Load and select the examples of one ``--tasks`` entry; errors are ``UserError``."""
    name, arg = split_spec(spec)
    _ensure_imported(name)
    info = _REGISTRY[name]
    if arg is not None and info.argument == "none":
        raise UserError(f"task {name!r} takes no argument; use --tasks {name}")
    if arg is None and info.argument == "path":
        raise UserError(f"task {name!r} needs a file: --tasks {name}:PATH")
    examples = info.loader(arg if info.argument == "path" else None, options)
    check_unique_ids(((f"#{i}", e.id) for i, e in enumerate(examples, start=1)), f"task {spec!r}",
                     "fix the data so each example has its own id")
    if arg is not None and info.argument == "categories":
        examples = filter_categories(name, examples, arg)
    examples = select(examples, options.limit, options.seed)
    if not examples:
        raise UserError(f"task {spec!r} selected no examples; check the file, categories and --limit")
    return examples


def split_tasks(text: str) -> list[str]:
    """``--tasks``: suites separated by commas, a suite's categories joined by ``+``
    (``spec_bench:summarization+math_reasoning,builtin``).

    Commas separate tasks and ``+`` separates categories, so the two never collide. A comma
    used between categories (``spec_bench:summarization,math_reasoning``) would read as a task
    named ``math_reasoning``; that is caught here and answered with the ``+`` spelling.
    """
    specs = [part.strip() for part in text.split(",") if part.strip()]
    for i, spec in enumerate(specs):
        name, _ = split_spec(spec)
        if name in BUILTIN_TASKS or name in _REGISTRY or i == 0 or ":" in spec:
            continue
        prev_name, prev_arg = split_spec(specs[i - 1])
        if prev_arg is not None:
            raise UserError(f"unknown task {name!r}; to select several categories join them with "
                            f"{CATEGORY_SEP!r}: --tasks {prev_name}:{prev_arg}{CATEGORY_SEP}{name}")
    return specs


def filter_categories(name: str, examples: Sequence[Example], arg: str) -> list[Example]:
    if "," in arg:
        raise UserError(f"categories are joined with {CATEGORY_SEP!r}, not ','; write "
                        f"{name}:{arg.replace(',', CATEGORY_SEP)}")
    wanted = [c.strip() for c in arg.split(CATEGORY_SEP) if c.strip()]
    known = sorted({e.category for e in examples})
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise UserError(f"unknown {name} category {', '.join(unknown)}; valid: {', '.join(known)}")
    return [e for e in examples if e.category in wanted]


def select(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded sample of ``limit`` examples, kept in source order (all of them without a limit).

    Sampling (rather than taking the head) avoids the bias of files sorted by category;
    the same seed gives the same subset on every machine and for every method.
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    picked = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in picked]


def task_hash(examples: Sequence[Example], extra: Any = None) -> str:
    """Content hash of the examples used (ids, turns, references) and any formatting inputs."""
    payload = json.dumps(
        {"examples": [e.to_json() for e in examples], "extra": extra}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
