"""GSM8K: grade-school math word problems. The question is the prompt; the reference is
the number after ``#### `` in the original answer. ``extract_answer`` reads the model's
final number, for an accuracy column."""

from __future__ import annotations

import re

from tasks.base import Example, TaskOptions, register_task
from tasks.sources import hub_rows, local_file, read_jsonl, source_label

INSTRUCTION = "{question}"
FILENAME = "test.jsonl"
HUB = ("openai/gsm8k", "main", "test")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """'1,000.50' -> '1000.5'; '$18' -> '18'; '18.00' -> '18'."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return cleaned
    return str(int(value)) if value == int(value) else repr(value)


def reference_answer(answer: str) -> str:
    """The final answer of a GSM8K solution: what follows the last ``#### ``."""
    return normalize_number(answer.rsplit("#### ", 1)[-1].strip())


def extract_answer(text: str) -> str | None:
    """The model's final numeric answer: the number after '####' or 'answer is', else the last number."""
    for marker in ("####", "answer is", "Answer:"):
        if marker in text:
            found = _NUMBER.findall(text.rsplit(marker, 1)[-1])
            if found:
                return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


@register_task("gsm8k", "GSM8K math word problems; reference = final number (accuracy)", argument="none",
               data_file=FILENAME)
def load_gsm8k(_: str | None, options: TaskOptions) -> list[Example]:
    path = local_file("gsm8k", FILENAME, options)
    if path:
        rows = list(read_jsonl(path, ("question", "answer")))
    else:
        rows = list(enumerate(hub_rows("gsm8k", *HUB[:2], HUB[2], FILENAME), start=1))
    source = source_label(path, HUB[0])
    return [
        Example(
            id=f"gsm8k-{lineno}",
            category="math",
            turns=(INSTRUCTION.format(question=row["question"]),),
            reference=reference_answer(row["answer"]),
            source=source,
            task="gsm8k",
        )
        for lineno, row in rows
    ]
