"""XSum: one-sentence summaries of BBC articles; the reference summary is kept for Rouge-2.

Truncation rule (the same for every method and model): an article longer than
``MAX_WORDS`` whitespace-separated words is cut to its first ``MAX_WORDS`` words and
" ..." is appended. Counting words rather than tokens keeps the prompt text, and so the
task hash, independent of the tokenizer; 400 words is about 550 SmolLM2 tokens, which
leaves room for the answer in a 2k context. ``--task-option xsum.max_words=N`` changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from base.options import option
from tasks.base import Example, TaskOptions, check_unique_ids, register_task, suite_options
from tasks.sources import hub_rows, local_file, read_jsonl, source_label

INSTRUCTION = "Summarize the following article in one sentence.\n\nArticle: {document}"
MAX_WORDS = 400
FILENAME = "test.jsonl"
HUB = ("EdinburghNLP/xsum", None, "test")


def truncate_words(text: str, max_words: int) -> str:
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    return " ".join(words[:max_words]) + " ..."


@dataclass(frozen=True)
class XsumOptions:
    max_words: int = option(MAX_WORDS, min=1, help="articles longer than this many words are cut")


@register_task("xsum", "XSum summarization (one sentence); reference summary for Rouge-2", argument="none",
               options=XsumOptions, data_file=FILENAME)
def load_xsum(_: str | None, options: TaskOptions) -> list[Example]:
    max_words = suite_options("xsum", options).max_words
    path = local_file("xsum", FILENAME, options)
    if path:
        numbered = list(read_jsonl(path, ("id", "document", "summary")))
        check_unique_ids(((n, str(row["id"])) for n, row in numbered), str(path), "give each article its own 'id'")
        rows = [row for _, row in numbered]
    else:
        rows = hub_rows("xsum", *HUB[:2], HUB[2], FILENAME)
    source = source_label(path, HUB[0])
    return [
        Example(
            id=f"xsum-{row['id']}",
            category="summarization",
            turns=(INSTRUCTION.format(document=truncate_words(row["document"], max_words)),),
            reference=row["summary"],
            source=source,
            task="xsum",
        )
        for row in rows
    ]
