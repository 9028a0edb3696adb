"""The one reading and writing layer for the files a user hands the tool.

Every file the harness reads (task data, results, manifests, baselines, heads configs,
tree and skip-set files) comes in through these helpers, so an unreadable path, bytes
that are not UTF-8 (a binary file, a UTF-16 export), malformed JSON or JSON of the wrong
shape all become one ``UserError`` line naming the file (and line) and saying what to do,
instead of a traceback from deep inside a reader. Outputs are checked with
``check_writable`` before any work starts, so a typo in ``-o`` costs a second, not a run.

This lives in ``base`` because ``tasks``, the methods and ``harness`` all use it, and
``tasks`` must import neither of the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from base.errors import UserError

def cache_root() -> Path:
    """Where converted models and measurements live: $SPECDEC_HARNESS_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    env = os.environ.get("SPECDEC_HARNESS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "specdec-harness"


_JSON_TYPES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer",
               float: "a number", bool: "true or false"}


def json_type_name(value: Any) -> str:
    """A user's word for a JSON value's type (``list`` -> "a JSON list")."""
    if value is None:
        return "null"
    for kind, name in _JSON_TYPES.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def _decode_error(path: Path, exc: UnicodeDecodeError, hint: str, lineno: int | None = None) -> UserError:
    where = f"{path}:{lineno}" if lineno is not None else str(path)
    data = exc.object if isinstance(exc.object, bytes) else b""
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) > 1 and b"\x00" in data[:64])
    kind = "UTF-16 or binary" if utf16 else "not UTF-8"
    return UserError(f"{where}: cannot decode byte 0x{data[exc.start]:02x} at offset {exc.start} "
                     f"({kind}); {hint}" if data else f"{where}: not UTF-8 text ({kind}); {hint}")


def read_bytes(path: Path, hint: str) -> bytes:
    """The file's bytes; a missing file, a folder or a permission problem is one line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a file; {hint}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or type(exc).__name__}); {hint}") from None


def read_text(path: Path, hint: str) -> str:
    """The file as UTF-8 text (a UTF-8 BOM is allowed); anything else is one line naming the file."""
    data = read_bytes(path, hint)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _decode_error(Path(path), exc, f"save it as UTF-8 text; {hint}") from None


def parse_json(text: str, where: str, hint: str, *, line_of_error: bool = True) -> Any:
    """``json.loads`` whose failures name ``where`` (and the line of the error inside a whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"{where}:{exc.lineno}" if line_of_error else where
        raise UserError(f"{at}: malformed JSON ({exc.msg}); {hint}") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply; {hint}") from None


def read_json(path: Path, hint: str, expect: type | None = dict) -> Any:
    """A whole-file JSON document, checked to be of type ``expect`` (a dict unless told otherwise)."""
    data = parse_json(read_text(path, hint), str(path), hint)
    if expect is not None and not isinstance(data, expect):
        raise UserError(f"{path}: expected {_JSON_TYPES.get(expect, expect.__name__)}, got "
                        f"{json_type_name(data)}; {hint}")
    return data


def iter_jsonl(path: Path, hint: str, required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line: each must decode, parse, be an object and hold ``required``."""
    path = Path(path)
    data = read_bytes(path, hint)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _decode_error(path, exc, f"save the file as UTF-8 JSON lines; {hint}", lineno) from None
        if not line.strip():
            continue
        row = parse_json(line, f"{path}:{lineno}", hint, line_of_error=False)
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {json_type_name(row)}; {hint}")
        missing = [f for f in required if f not in row]
        if missing:
            raise UserError(f"{path}:{lineno}: missing field {', '.join(repr(m) for m in missing)} "
                            f"(each line needs {', '.join(required)}); {hint}")
        yield lineno, row


def require_shape(value: Any, shape: Mapping[str, type | tuple[type, ...]], where: str, hint: str, *,
                  allow_null: bool = True) -> None:
    """``value`` is an object whose listed keys, where present (and not null, if allowed), have the listed types."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object, got {json_type_name(value)}; {hint}")
    for key, kind in shape.items():
        if key in value and not (allow_null and value[key] is None) and not isinstance(value[key], kind):
            raise UserError(f"{where}: {key!r} should be {_kind_name(kind)}, got {json_type_name(value[key])}; {hint}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_JSON_TYPES.get(k, k.__name__) for k in kinds)


def check_writable(path: Path, flag: str) -> Path:
    """Fail now, not after the work, when ``path`` cannot be written as a file.

    Probes by opening for append (then removing the file if the probe created it): unlike
    ``os.access``, that also tells the truth for root and for special filesystems.
    """
    path = Path(path).expanduser()
    parent = path.parent
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name inside it, e.g. {path / 'out.html'}")
    if not parent.exists():
        raise UserError(f"{flag} {path}: folder {parent} does not exist; create it first or choose another {flag}")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be written ({exc.strerror or type(exc).__name__}); "
                        f"choose another {flag}") from None
    if not existed:
        try:
            path.unlink()
        except OSError:
            pass
    return path


def write_text(path: Path, text: str, flag: str) -> Path:
    """Write ``text`` to ``path``; a failure (disk full, permissions changed mid-run) is one line."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or type(exc).__name__}); choose another {flag}") from None
    return Path(path)
