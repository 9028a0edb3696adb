"""Typed method options: each method declares a dataclass, and every value is checked before the model loads.

A field's type annotation gives the conversion of a command-line string (int, float,
bool, str, or ``X | None``); ``option(...)`` adds a range or a set of choices and the help
text ``harness list`` shows. A dataclass may add ``validate()`` for checks across fields
or of a value's shape (a tree spec); it raises ``ValueError`` with a readable message.
An unknown key, a wrong type or a bad value becomes one ``UserError`` line naming the
method and listing its valid options.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from base.errors import UserError


def option(default: Any, *, help: str = "", min: float | None = None, max: float | None = None,
           choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with validation metadata."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices})


@dataclass(frozen=True)
class NoOptions:
    """A method without settings."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        last: Exception | None = None
        for arg in args:
            try:
                return _convert(value, arg)
            except (TypeError, ValueError) as exc:
                last = exc
        raise last or ValueError(f"unsupported value {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, (dict, list)):
            import json

            return json.dumps(value)
        return str(value)
    return value  # Any: passed through (e.g. a dict given from Python)


def describe_options(cls: type) -> list[str]:
    """``name=default (type, range): help`` per option, for error messages and ``harness list``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        type_name = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
        meta = f.metadata
        rng = ""
        if meta.get("choices"):
            rng = ", one of " + "|".join(map(str, meta["choices"]))
        elif meta.get("min") is not None or meta.get("max") is not None:
            rng = f", {meta.get('min', '')}..{meta.get('max') if meta.get('max') is not None else ''}"
        out.append(f"{f.name}={f.default} ({type_name}{rng})" + (f": {meta['help']}" if meta.get("help") else ""))
    return out


def parse_options(cls: type, raw: Mapping[str, Any], *, where: str) -> Any:
    """Build ``cls`` from strings or values; any problem is a ``UserError`` that lists the valid options."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = ", ".join(fields) or "none"
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise UserError(f"unknown option {where}.{unknown[0]}; valid options for {where}: {valid}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields[key]
        try:
            converted = _convert(value, hints[key])
        except ValueError as exc:
            raise UserError(f"bad value for {where}.{key}: {exc}") from None
        meta = f.metadata
        if converted is not None:
            if meta.get("choices") and converted not in meta["choices"]:
                raise UserError(f"bad value for {where}.{key}: {converted!r} is not one of "
                                f"{', '.join(map(str, meta['choices']))}")
            if meta.get("min") is not None and converted < meta["min"]:
                raise UserError(f"bad value for {where}.{key}: {converted} is below the minimum {meta['min']}")
            if meta.get("max") is not None and converted > meta["max"]:
                raise UserError(f"bad value for {where}.{key}: {converted} is above the maximum {meta['max']}")
        values[key] = converted
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise UserError(f"bad {where} options: {exc}") from None
    return obj
