"""``jsonl:PATH``: a user's own prompt file, one JSON object per line.

Field names come from ``--task-option``: ``jsonl.prompt=FIELD`` (default ``prompt``; a
list of strings is taken as turns), ``jsonl.reference=FIELD`` (default ``reference``,
optional), ``jsonl.id=FIELD`` (default ``id``, else the line number) and
``jsonl.category=FIELD`` (default ``category``, else ``jsonl``)."""

from __future__ import annotations

from pathlib import Path

from methods.core.errors import UserError
from tasks.base import Example, TaskOptions, register_task
from tasks.sources import read_jsonl


@register_task("jsonl", "your own JSONL file: --tasks jsonl:PATH (fields via --task-option jsonl.prompt=...)",
               argument="path")
def load_jsonl(arg: str | None, options: TaskOptions) -> list[Example]:
    path = Path(str(arg)).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file (given by --tasks jsonl:{arg})")
    get = options.extra.get
    prompt_f, ref_f = get("jsonl.prompt", "prompt"), get("jsonl.reference", "reference")
    id_f, cat_f = get("jsonl.id", "id"), get("jsonl.category", "category")
    examples = []
    for lineno, row in read_jsonl(path, (prompt_f,)):
        prompt = row[prompt_f]
        turns = tuple(prompt) if isinstance(prompt, list) else (prompt,)
        if not turns or not all(isinstance(t, str) and t for t in turns):
            raise UserError(f"{path}:{lineno}: field {prompt_f!r} must be a non-empty string or list of strings")
        ref = row.get(ref_f)
        examples.append(Example(
            id=f"jsonl-{row.get(id_f, lineno)}", category=str(row.get(cat_f, "jsonl")), turns=turns,
            reference=None if ref is None else str(ref), source=str(path), task=f"jsonl:{arg}",
        ))
    return examples
