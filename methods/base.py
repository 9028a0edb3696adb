"""The ``Decoder`` interface and the method registry.

Every method, the baseline included, implements ``generate`` on a shared ``Engine``
and reports per-step statistics in one format, so metrics never need to know which
method produced a record. Method modules are imported lazily: ``harness list`` and a
run of one method do not pay for importing (or failing to import) the others.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from methods.engine import Engine

# name -> module that registers it. Adding a method = adding a file and a line here.
BUILTIN_METHODS: dict[str, str] = {
    "vanilla": "methods.vanilla",
    "medusa": "methods.medusa",
    "firp": "methods.firp",
    "pld": "methods.pld",
    "self_spec": "methods.self_spec",
    "lookahead": "methods.lookahead",
}

_REGISTRY: dict[str, type[Decoder]] = {}


def register_method(name: str):
    """Class decorator: make a ``Decoder`` available under ``name`` (``--methods name``)."""

    def wrap(cls: type[Decoder]) -> type[Decoder]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


class UnknownMethodError(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
        self.valid = available_methods()

    def __str__(self) -> str:
        return f"unknown method {self.name!r}; valid methods: {', '.join(self.valid)}"


def available_methods() -> list[str]:
    return sorted(set(BUILTIN_METHODS) | set(_REGISTRY))


def get_method(name: str) -> type[Decoder]:
    if name not in _REGISTRY:
        module = BUILTIN_METHODS.get(name)
        if module is None:
            raise UnknownMethodError(name)
        importlib.import_module(module)
    return _REGISTRY[name]


@dataclass
class Generation:
    """One ``generate`` call's output.

    Per-step lists are columnar (one entry per target forward pass during decoding,
    prefill included) so that results stay small and metrics vectorise:

    * ``accepted[i]``: tokens committed by step i, bonus token included (vanilla: 1);
    * ``draft_sizes[i]``: draft tokens verified in step i (vanilla: 0);
    * ``draft_times`` / ``verify_times``: seconds, where the method can separate them.
    """

    tokens: list[int]
    accepted: list[int] = field(default_factory=list)
    draft_sizes: list[int] = field(default_factory=list)
    draft_times: list[float] = field(default_factory=list)
    verify_times: list[float] = field(default_factory=list)
    stopped_by: str = "length"  # "length" | "eos"
    extra: dict[str, Any] = field(default_factory=dict)

    def add_step(self, new: list[int], draft_size: int, draft_time: float, verify_time: float) -> None:
        """Record one target forward that committed ``new`` tokens after verifying ``draft_size`` drafts."""
        self.tokens.extend(new)
        self.accepted.append(len(new))
        self.draft_sizes.append(draft_size)
        self.draft_times.append(draft_time)
        self.verify_times.append(verify_time)

    @property
    def target_forwards(self) -> int:
        return len(self.accepted)

    def mean_accepted_length(self) -> float:
        return len(self.tokens) / self.target_forwards if self.target_forwards else 0.0


class Decoder(ABC):
    """A decoding strategy on a shared engine. Subclasses are registered by name."""

    name: ClassVar[str] = "?"

    def __init__(self, engine: Engine, model_name: str = "", **options: Any) -> None:
        self.engine = engine
        self.model_name = model_name
        self.options = options

    @classmethod
    def check_ready(cls, model_name: str, options: dict[str, Any]) -> None:
        """Raise ``harness.errors.UserError`` before the model loads if the method lacks something."""

    def describe(self) -> dict[str, Any]:
        """The method's configuration, recorded in the results manifest."""
        return {"name": self.name, **self.options}

    @abstractmethod
    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Collection[int] = ()
    ) -> Generation:
        """Greedy-decode up to ``max_new_tokens`` after ``prompt_ids``; stop after any ``stop`` id."""

    # -- shared helpers -------------------------------------------------------------------
    def _sync(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def _now(self) -> float:
        """A timestamp for draft/verify splits: synchronised on CUDA so the split is real."""
        self._sync()
        return time.perf_counter()


def truncate_at_stop(tokens: list[int], stop: Collection[int], limit: int) -> tuple[list[int], bool]:
    """Cut accepted tokens at the first stop id (kept) and at ``limit``; report whether a stop was hit.

    Speculative methods accept several tokens at once, so the stop can sit mid-block;
    cutting here gives every method exactly the vanilla stopping semantics.
    """
    for i, t in enumerate(tokens[:limit]):
        if t in stop:
            return tokens[: i + 1], True
    return tokens[:limit], False
