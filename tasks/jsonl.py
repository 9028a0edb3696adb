"""``jsonl:PATH``: a user's own prompt file, one JSON object per line.

Field names come from ``--task-option``: ``jsonl.prompt=FIELD`` (default ``prompt``; a
list of strings is taken as turns), ``jsonl.reference=FIELD`` (default ``reference``,
optional), ``jsonl.id=FIELD`` (default ``id``, else the line number) and
``jsonl.category=FIELD`` (default ``category``, else ``jsonl``). Ids must be unique within
the file (results are keyed by them): a repeated id is refused, naming both lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from base.errors import UserError
from base.options import option
from tasks.base import Example, TaskOptions, check_unique_ids, register_task, suite_options
from tasks.sources import read_jsonl


@dataclass(frozen=True)
class JsonlOptions:
    prompt: str = option("prompt", help="field with the prompt (a string, or a list of strings as turns)")
    reference: str = option("reference", help="field with the reference answer (optional)")
    id: str = option("id", help="field with a unique example id (default: the line number)")
    category: str = option("category", help="field with the category (default: jsonl)")


@register_task("jsonl", "your own JSONL file: --tasks jsonl:PATH (fields via --task-option jsonl.prompt=...)",
               argument="path", options=JsonlOptions)
def load_jsonl(arg: str | None, options: TaskOptions) -> list[Example]:
    """Ids must be unique within the file: a repeated id is refused, naming both lines."""
    path = Path(str(arg)).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file (given by --tasks jsonl:{arg})")
    opts = suite_options("jsonl", options)
    prompt_f, ref_f, id_f, cat_f = opts.prompt, opts.reference, opts.id, opts.category
    examples, lines = [], []
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
        lines.append(lineno)
    check_unique_ids(zip(lines, (e.id.removeprefix("jsonl-") for e in examples)), str(path),
                     f"give each line its own {id_f!r}, or drop the field to number lines, or pick another field "
                     "with --task-option jsonl.id=FIELD")
    return examples
