"""The Spec-Bench / FastChat question format shared by ``mt_bench`` and ``spec_bench``:
JSON lines with ``question_id``, ``category``, ``turns`` (one or more user messages) and
optionally ``reference`` (a string or one string per turn)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from base.errors import UserError
from tasks.base import Example, check_unique_ids
from tasks.sources import read_jsonl

FIELDS = ("question_id", "category", "turns")


def _reference(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return "\n\n".join(str(v) for v in value)
    return str(value)


def read_questions(path: Path, task: str) -> list[Example]:
    examples, lines = [], []
    for lineno, row in read_jsonl(path, FIELDS):
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise UserError(f"{path}:{lineno}: 'turns' must be a non-empty list of strings")
        examples.append(Example(
            id=f"{task}-{row['question_id']}", category=str(row["category"]), turns=tuple(turns),
            reference=_reference(row.get("reference")), source=str(path), task=task,
        ))
        lines.append(lineno)
    check_unique_ids(zip(lines, (e.id.removeprefix(f"{task}-") for e in examples)), str(path),
                     "give each question its own question_id")
    return examples


def from_rows(rows: Iterable[dict[str, Any]], task: str, source: str, *, id_field: str, turns_field: str) -> list[Example]:
    """Hub rows; their ids are checked for uniqueness in ``load_task``."""
    return [
        Example(id=f"{task}-{row[id_field]}", category=str(row["category"]), turns=tuple(row[turns_field]),
                reference=_reference(row.get("reference")) or None, source=source, task=task)
        for row in rows
    ]
