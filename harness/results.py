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

RESULTS_FILE = "results.jsonl"
MANIFEST_FILE = "manifest.json"
DIVERGENCES_FILE = "divergences.jsonl"


def record_key(record: dict[str, Any]) -> tuple[str, str, str]:
    return record["task"], record["example_id"], record["method"]


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read a results file; a malformed line names the file and line number."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if not repair:
            raise UserError(f"{path}: the last line is truncated (an interrupted run?); rerun `run` to repair it")
        print(f"warning: {path}: dropping a truncated last record (it will be run again)", file=sys.stderr)
        with path.open("r+b") as fh:
            fh.truncate(cut)
        data = data[:cut]
    records = []
    for lineno, line in enumerate(data.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or delete that line") from None
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


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {MANIFEST_FILE}); pass the --out folder of a `run`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed manifest ({exc.msg})") from None


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = run_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(run_dir / MANIFEST_FILE)


def iter_turns(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from record.get("turns", [])
