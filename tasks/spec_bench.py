"""Spec-Bench / FastChat question files: any JSONL with ``question_id``, ``category``,
``turns`` and optionally ``reference``. ``--tasks spec_bench:summarization+math_reasoning``
selects categories (joined by ``+``: commas separate tasks), and results are reported per category. Spec-Bench publishes its
question file in its repository, not as a hub dataset, so a local file is required."""

from __future__ import annotations

from base.errors import UserError
from tasks.base import Example, TaskOptions, register_task
from tasks.question_format import read_questions
from tasks.sources import local_file

FILENAME = "question.jsonl"


@register_task("spec_bench", "Spec-Bench / FastChat question file (categories selectable)",
               data_file=FILENAME)
def load_spec_bench(_: str | None, options: TaskOptions) -> list[Example]:
    path = local_file("spec_bench", FILENAME, options)
    if path is None:
        raise UserError(
            "task 'spec_bench' needs its question file: pass --data-dir DIR holding spec_bench/question.jsonl, "
            "or --task-path spec_bench=FILE (Spec-Bench's data/spec_bench/question.jsonl)"
        )
    return read_questions(path, "spec_bench")
