"""The method registry: one ``MethodSpec`` per method, found by name without importing the others.

A method is a folder ``methods/<name>/`` whose ``__init__.py`` defines ``SPEC``; adding a
built-in method is that folder plus one line in ``BUILTIN``. Another package can call
``register(spec)``. The harness finds everything about a method through its spec: the
decoder and its options, and the optional ``train`` / ``tune`` / ``analyze`` entry points
and report section, given as ``"module:function"`` so they load only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from methods.core.errors import UserError

BUILTIN: dict[str, str] = {
    "vanilla": "methods.vanilla",
    "medusa": "methods.medusa",
    "firp": "methods.firp",
    "pld": "methods.pld",
    "lookahead": "methods.lookahead",
    "self_spec": "methods.self_spec",
    "eagle": "methods.eagle",
    "sps": "methods.sps",
}

ENTRY_POINTS = ("train", "tune", "analyze", "report")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the harness may ask of a method.

    ``train(config, model, tokenizer, data, data_key, toolkit)``, ``tune(args, toolkit)`` and
    ``analyze(args, toolkit)`` are the CLI commands of the same names; ``report(run_dir)``
    returns ``{"title", "html"}`` for the run's report, or None when it has nothing to show.
    """

    name: str
    decoder: type
    summary: str
    needs: str = "nothing"
    train: str | None = None
    tune: str | None = None
    analyze: str | None = None
    report: str | None = None

    @property
    def options(self) -> type:
        return self.decoder.Options

    def entry(self, kind: str) -> Callable[..., Any] | None:
        target = getattr(self, kind)
        if target is None:
            return None
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    spec.decoder.name = spec.name
    _SPECS[spec.name] = spec
    return spec


class UnknownMethodError(UserError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown method {name!r}; valid methods: {', '.join(available_methods())}")
        self.name = name


def available_methods() -> list[str]:
    return sorted(set(BUILTIN) | set(_SPECS))


def get_spec(name: str) -> MethodSpec:
    if name not in _SPECS:
        module = BUILTIN.get(name)
        if module is None:
            raise UnknownMethodError(name)
        register(importlib.import_module(module).SPEC)
    return _SPECS[name]


def methods_with(kind: str) -> list[str]:
    """Methods offering an entry point (``train``, ``tune``, ...), for error messages and help."""
    return [name for name in available_methods() if getattr(get_spec(name), kind) is not None]
