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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from methods.core.errors import UserError


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


_REGISTRY: dict[str, TaskInfo] = {}


def register_task(name: str, description: str, argument: str = "categories"):
    """Register ``loader(argument, options) -> examples`` under ``name`` (``--tasks name[:argument]``).

    With ``argument="categories"`` the loader returns every example and ``load_task``
    applies ``name:cat1+cat2`` itself, so every suite filters and reports alike.
    """

    def wrap(fn: Loader) -> Loader:
        _REGISTRY[name] = TaskInfo(fn, description, argument)
        return fn

    return wrap


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
