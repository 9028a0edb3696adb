"""Finding and reading a suite's data: a local file first, else the canonical hub dataset.

Local files are read in exactly the formats of the original releases (the layout of
``../shared/data``). Every problem names the file and line, and says what to do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from base.errors import UserError
from base.files import iter_jsonl
from tasks.base import TaskOptions


def local_file(suite: str, filename: str, options: TaskOptions) -> Path | None:
    """``--task-path suite=FILE`` wins, then ``--data-dir DIR`` as ``DIR/<suite>/<filename>``."""
    if suite in options.paths:
        path = options.paths[suite]
        if not path.is_file():
            raise UserError(f"{path}: no such file (given by --task-path {suite}=...)")
        return path
    if options.data_dir is not None:
        path = options.data_dir / suite / filename
        if not path.is_file():
            raise UserError(
                f"{path}: no such file; --data-dir expects {suite}/{filename} inside it "
                f"(or pass --task-path {suite}=FILE)"
            )
        return path
    return None


def read_jsonl(path: Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object); undecodable bytes, a malformed line or a missing field is a ``UserError``."""
    yield from iter_jsonl(path, "fix or remove that line (one JSON object per line, UTF-8)", required)


def hub_rows(suite: str, dataset: str, config: str | None, split: str, filename: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset, for users with a network; offline it says how to use a local file."""
    hint = f"pass --data-dir DIR holding {suite}/{filename}, or --task-path {suite}=FILE"
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(f"task {suite!r} has no local file, and loading it from the hub needs the `datasets` "
                        f"package: pip install -e \".[hub]\" (the hub extra), or {hint}") from None
    try:
        data = load_dataset(dataset, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no data", with the cause shown
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load hub dataset {dataset} for task {suite!r} ({first[:200]}). "
                        f"Offline? {hint}") from None
    return [dict(row) for row in data]


def source_label(path: Path | None, dataset: str) -> str:
    return str(path) if path is not None else f"hub:{dataset}"
