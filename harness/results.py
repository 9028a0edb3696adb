"""Results on disk: one JSONL record per (task, example, method), plus ``manifest.json``.

Records are appended and flushed one at a time so an interrupted run loses at most the
record in flight; a truncated last line (a crash mid-write) is detected and cut off on
resume, with a warning, and that record is simply run again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from methods.core.errors import UserError
from methods.core.files import iter_jsonl, read_bytes, read_json, require_shape

RESULTS_FILE = "results.jsonl"
MANIFEST_FILE = "manifest.json"
DIVERGENCES_FILE = "divergences.jsonl"


def record_key(record: dict[str, Any]) -> tuple[str, str, str]:
    return record["task"], record["example_id"], record["method"]


RESULTS_HINT = "fix or delete that line (it will be run again), or rerun with --overwrite"
_RECORD_SHAPE = {"task": str, "example_id": (str, int), "method": str}
_DONE_SHAPE = {"turns": list, "new_tokens": int, "wall_time": (int, float), "target_forwards": int}
_TURN_SHAPE = {"tokens": list, "text": str, "accepted": list, "draft_sizes": list}


def check_record(record: Any, where: str) -> dict[str, Any]:
    """A record has the keys and types metrics read; anything else would be a KeyError deep in pandas."""
    require_shape(record, {**_RECORD_SHAPE, **_DONE_SHAPE}, where, RESULTS_HINT)
    needed = list(_RECORD_SHAPE) + ([] if record.get("skipped") else list(_DONE_SHAPE))
    missing = [k for k in needed if record.get(k) is None]
    if missing:
        raise UserError(f"{where}: record lacks {', '.join(repr(k) for k in missing)}; {RESULTS_HINT}")
    for i, turn in enumerate(record.get("turns") or [], start=1):
        require_shape(turn, _TURN_SHAPE, f"{where} (turn {i})", RESULTS_HINT)
        lacking = [k for k in _TURN_SHAPE if k not in turn]
        if lacking:
            raise UserError(f"{where}: turn {i} lacks {', '.join(repr(k) for k in lacking)}; {RESULTS_HINT}")
    return record


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read a results file; an undecodable, malformed or misshapen line names the file and line number."""
    if not path.exists():
        return []
    data = read_bytes(path, "pass a run folder written by `run`")
    cut = data.rfind(b"\n") + 1
    try:  # complete lines first: a UTF-16 or binary file is not "truncated", it is the wrong file
        data[:cut].decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: cannot decode byte 0x{data[exc.start]:02x} (not UTF-8 JSON lines: "
                        f"UTF-16 or binary?); {RESULTS_HINT}") from None
    if data and not data.endswith(b"\n"):
        if not repair:
            raise UserError(f"{path}: the last line is truncated (an interrupted run?); rerun `run` to repair it")
        print(f"warning: {path}: dropping a truncated last record (it will be run again)", file=sys.stderr)
        try:
            with path.open("r+b") as fh:
                fh.truncate(cut)
        except OSError as exc:
            raise UserError(f"cannot repair {path} ({exc.strerror}); make it writable or use another --out") from None
    records, seen = [], {}
    for lineno, rec in iter_jsonl(path, RESULTS_HINT):
        key = record_key(check_record(rec, f"{path}:{lineno}"))
        if key in seen:  # two records of one key would pair with each other and skew every metric
            raise UserError(f"{path}: lines {seen[key]} and {lineno} both hold {key[2]} on {key[0]} example "
                            f"{key[1]}; delete one of them (two runs wrote to one folder?)")
        seen[key] = lineno
        records.append(rec)
    return records


class ResultsWriter:
    """Append-only JSONL sink; each record is flushed and fsynced before the next starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MANIFEST_HINT = "the run folder is damaged; rerun `run` with --overwrite to start afresh"
_MANIFEST_SHAPE = {"config": dict, "tasks": dict, "method_options": dict, "methods": dict, "environment": dict,
                   "model": dict, "dtype": str}


def load_manifest_file(path: Path) -> dict[str, Any]:
    """``manifest.json`` parsed and shape-checked: a list, or a ``config`` that is a string, is one line."""
    manifest = read_json(path, MANIFEST_HINT)
    require_shape(manifest, _MANIFEST_SHAPE, str(path), MANIFEST_HINT, allow_null=False)
    require_shape(manifest.get("config") or {}, {"identity": dict, "methods": list, "model": str},
                  f"{path} (config)", MANIFEST_HINT)
    for name, info in (manifest.get("tasks") or {}).items():
        require_shape(info, {"hash": str}, f"{path} (task {name!r})", MANIFEST_HINT)
    for name, opts in (manifest.get("method_options") or {}).items():
        require_shape(opts, {}, f"{path} (options of {name!r})", MANIFEST_HINT)
    return manifest


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {MANIFEST_FILE}); pass the --out folder of a `run`")
    return load_manifest_file(path)


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = run_dir / (MANIFEST_FILE + ".tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(run_dir / MANIFEST_FILE)
    except OSError as exc:
        raise UserError(f"cannot write {run_dir / MANIFEST_FILE} ({exc.strerror}); check the folder's "
                        "permissions and free space") from None


def iter_turns(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from record.get("turns", [])
