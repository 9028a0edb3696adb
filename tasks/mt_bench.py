"""MT-bench: 80 two-turn questions in 8 categories. The second turn is asked after the
model's *own* first answer, as FastChat and Spec-Bench do; timing and statistics cover
both turns and are also kept per turn. ``mt_bench:writing,coding`` selects categories."""

from __future__ import annotations

from tasks.base import Example, TaskOptions, register_task
from tasks.question_format import from_rows, read_questions
from tasks.sources import hub_rows, local_file

FILENAME = "question.jsonl"
HUB = ("HuggingFaceH4/mt_bench_prompts", None, "train")


@register_task("mt_bench", "MT-bench two-turn chat (8 categories); turn 2 follows the model's own answer",
               data_file=FILENAME)
def load_mt_bench(_: str | None, options: TaskOptions) -> list[Example]:
    path = local_file("mt_bench", FILENAME, options)
    if path:
        return read_questions(path, "mt_bench")
    rows = hub_rows("mt_bench", *HUB[:2], HUB[2], FILENAME)
    return from_rows(rows, "mt_bench", f"hub:{HUB[0]}", id_field="prompt_id", turns_field="prompt")
