"""Typed method options: each method declares a dataclass, and every value is checked before the model loads.

A field's type annotation gives the conversion of a command-line string (int, float,
bool, str, or ``X | None``); ``option(...)`` adds a range or a set of choices and the help
text ``harness list`` shows. A dataclass may add ``validate()`` for checks across fields
or of a value's shape (a tree spec); it raises ``ValueError`` with a readable message.
An unknown key, a wrong type or a bad value becomes one ``UserError`` line naming the
method and listing its valid options.

A dataclass may also accept another project's names for its options (``ALIASES``: an upstream
repository's ``top_k`` beside our ``topk``, converted to our meaning where the two count
differently) and named sets of settings (``PRESETS``, chosen by the ``preset`` key), so a user can
type a configuration as its authors published it. Both resolve here, before any value reaches the
dataclass: the dataclass and the recorded option dicts hold our names only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
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


PRESET = "preset"  # the key that names one of a dataclass's ``PRESETS``


@dataclass(frozen=True)
class Alias:
    """Another name for one of our options, in the meaning it has where that name comes from.

    Upstream code often counts the same setting differently (levels vs expansion passes, with or
    without the root), so an alias carries both conversions: ``to_ours`` for what the user types,
    ``from_ours`` for showing our defaults, ranges and recorded values in the alias's terms. Both
    must be increasing where they are numeric, so that a range maps onto a range.
    """

    name: str                           # the name the user types (``top_k``)
    field: str                          # our option it sets (``topk``)
    mapping: str                        # the conversion in words, shown by ``harness list`` and in errors
    help: str = ""                      # what the name means where it comes from
    to_ours: Callable[[Any], Any] = lambda v: v
    from_ours: Callable[[Any], Any] = lambda v: v
    kind: Any = None                    # the type of the typed value; None: our field's


@dataclass(frozen=True)
class Preset:
    """A named set of settings (``method@preset=NAME``), in any of the accepted names."""

    settings: Mapping[str, Any]
    help: str


def _aliases(cls: type) -> dict[str, Alias]:
    return {a.name: a for a in getattr(cls, "ALIASES", ())}


def _presets(cls: type) -> Mapping[str, Preset]:
    return getattr(cls, "PRESETS", {})


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


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _range_text(meta: Mapping[str, Any], convert: Callable[[Any], Any] = lambda v: v) -> str:
    if meta.get("choices"):
        return ", one of " + "|".join(str(convert(c)) for c in meta["choices"])
    low, high = meta.get("min"), meta.get("max")
    if low is None and high is None:
        return ""
    return f", {'' if low is None else convert(low)}..{'' if high is None else convert(high)}"


def describe_options(cls: type) -> list[str]:
    """``name=default (type, range): help`` per option, for error messages and ``harness list``;
    then each alias in its own terms with its mapping onto ours, and each preset in both names."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for f in fields.values():
        meta = f.metadata
        out.append(f"{f.name}={f.default} ({_type_name(hints[f.name])}{_range_text(meta)})"
                   + (f": {meta['help']}" if meta.get("help") else ""))
    for alias in _aliases(cls).values():
        f = fields[alias.field]
        kind = alias.kind or hints[alias.field]
        out.append(f"{alias.name}={alias.from_ours(f.default)} ({_type_name(kind)}"
                   f"{_range_text(f.metadata, alias.from_ours)}): "
                   + (f"{alias.help}; " if alias.help else "") + f"sets {alias.field}: {alias.mapping}")
    for name, preset in _presets(cls).items():
        given = ", ".join(f"{k}={v}" for k, v in preset.settings.items())
        resolved = _resolve(cls, preset.settings, where=cls.__name__)
        ours = ", ".join(f"{k}={resolved[k]}" for k in fields if k in resolved)
        out.append(f"{PRESET}={name}: {given} (= {ours}): {preset.help}")
    return out


def _range_problem(meta: Mapping[str, Any], value: Any) -> tuple[str, Any] | None:
    """What is wrong with ``value`` against a field's choices or range, and the bound it breaks."""
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return "is not one of", meta["choices"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # ranges bound numbers; another type (``auto``) is the dataclass's validate() to judge
    if meta.get("min") is not None and value < meta["min"]:
        return "is below the minimum", meta["min"]
    if meta.get("max") is not None and value > meta["max"]:
        return "is above the maximum", meta["max"]
    return None


def _problem_text(value: Any, problem: tuple[str, Any], convert: Callable[[Any], Any] = lambda v: v) -> str:
    words, bound = problem
    if words == "is not one of":
        return f"{value!r} is not one of {', '.join(str(convert(c)) for c in bound)}"
    return f"{value} {words} {convert(bound)}"


def _field_value(cls: type, key: str, value: Any, *, where: str) -> Any:
    """One of our options, typed and checked against its range."""
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    try:
        converted = _convert(value, typing.get_type_hints(cls)[key])
    except ValueError as exc:
        raise UserError(f"bad value for {where}.{key}: {exc}") from None
    problem = _range_problem(f.metadata, converted)
    if problem is not None:
        raise UserError(f"bad value for {where}.{key}: {_problem_text(converted, problem)}")
    return converted


def _alias_value(cls: type, alias: Alias, value: Any, *, where: str) -> Any:
    """An alias's value converted to our option's meaning; a problem is told in the alias's terms."""
    f = {f.name: f for f in dataclasses.fields(cls)}[alias.field]
    try:
        typed = _convert(value, alias.kind or typing.get_type_hints(cls)[alias.field])
        ours = alias.to_ours(typed)
    except ValueError as exc:
        raise UserError(f"bad value for {where}.{alias.name}: {exc}") from None
    problem = _range_problem(f.metadata, ours)
    if problem is not None:
        raise UserError(f"bad value for {where}.{alias.name}: {_problem_text(typed, problem, alias.from_ours)} "
                        f"({alias.mapping})")
    return ours


def _resolve(cls: type, raw: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """One layer of settings under our names, typed: its preset first, its own settings over it.

    Two names for one option in the same layer must agree (after conversion): which one the user
    meant is not ours to guess, and a silent pick would run another configuration than the one typed.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    aliases, presets = _aliases(cls), _presets(cls)
    known = [*fields, *aliases, *([PRESET] if presets else [])]
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise UserError(f"unknown option {where}.{unknown[0]}; valid options for {where}: {', '.join(known) or 'none'}")
    resolved: dict[str, Any] = {}
    if PRESET in raw:
        name = str(raw[PRESET]).strip()
        if name not in presets:
            raise UserError(f"unknown preset {where}.{PRESET}={name}; valid presets for {where}: {', '.join(presets)}")
        resolved = _resolve(cls, presets[name].settings, where=where)
    given: dict[str, tuple[str, Any]] = {}  # our name -> (the name typed, its value in our terms)
    for key, value in raw.items():
        if key == PRESET:
            continue
        alias = aliases.get(key)
        target = alias.field if alias else key
        ours = _alias_value(cls, alias, value, where=where) if alias else _field_value(cls, key, value, where=where)
        if target in given and given[target][1] != ours:
            first, before = given[target]
            how = "; ".join(a.mapping for a in aliases.values() if a.field == target and a.name in (first, key))
            raise UserError(f"{where}.{first}={raw[first]} and {where}.{key}={value} set {target} to {before} and "
                            f"{ours} ({how}); give one of the two names")
        given[target] = (key, ours)
    resolved.update({target: ours for target, (_, ours) in given.items()})
    return resolved


def parse_options(cls: type, *layers: Mapping[str, Any], where: str) -> Any:
    """Build ``cls`` from strings or values; any problem is a ``UserError`` that lists the valid options.

    Several layers (the run-wide settings, then a variant's) apply in order, each overriding the
    earlier ones option by option, whichever name each layer uses for it.
    """
    values: dict[str, Any] = {}
    for raw in layers:
        values.update(_resolve(cls, raw, where=where))
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise UserError(f"bad {where} options: {exc}") from None
    return obj


def alias_values(options: Any) -> dict[str, Any]:
    """The options' values under their aliases' names and meaning (``{"top_k": 10, ...}``), for a
    manifest to state a configuration in the terms of the code it is compared with; {} without aliases."""
    return {a.name: a.from_ours(getattr(options, a.field)) for a in _aliases(type(options)).values()}
