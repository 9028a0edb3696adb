"""The project's own small suite, so that ``python -m harness run`` needs no data files.

Twelve prompts written for this project: four summarisation requests over short
passages (input-grounded, where copying helps drafting), four math word problems
(structured step-by-step text) and four open chat questions (free-form text).
"""

from __future__ import annotations

from tasks.base import Example, TaskOptions, register_task

SUMMARIZE = "Summarize the following text in one sentence.\n\n"

_PROMPTS: list[tuple[str, str, str | None]] = [
    (
        "summarization",
        SUMMARIZE
        + "The town council voted on Tuesday to close the old library on Main Street and move its "
        "collection to the community centre. Councillors said the building needed repairs costing more "
        "than the town could afford. Residents who attended the meeting asked for longer opening hours "
        "at the new site, and the council agreed to review the hours after six months.",
        "The town council voted to move the Main Street library into the community centre because the "
        "old building needed repairs it could not afford.",
    ),
    (
        "summarization",
        SUMMARIZE
        + "A team of volunteers spent the weekend cleaning the river bank near the old mill. They "
        "collected more than two hundred bags of rubbish, including plastic bottles, tyres and a "
        "shopping trolley. The organisers plan to hold another clean-up in the spring and hope to "
        "install more bins along the footpath.",
        "Volunteers collected over two hundred bags of rubbish from the river bank and plan another "
        "clean-up in the spring.",
    ),
    (
        "summarization",
        SUMMARIZE
        + "The school's robotics club won first prize at the regional competition last month. Their "
        "robot had to sort coloured blocks and stack them in the right order within three minutes. "
        "The students built it from spare parts and wrote all of the software themselves. They will "
        "now compete in the national final in June.",
        "A school robotics club that built its robot from spare parts won the regional competition and "
        "will go to the national final.",
    ),
    (
        "summarization",
        SUMMARIZE
        + "Heavy rain over the weekend caused flooding in several villages along the coast. Roads "
        "were closed and some homes were left without power for up to a day. Emergency services "
        "helped residents move to higher ground, and no injuries were reported. Forecasters expect "
        "drier weather later in the week.",
        "Weekend rain flooded coastal villages, closing roads and cutting power, but nobody was hurt.",
    ),
    (
        "math",
        "Tom has 3 boxes with 12 apples in each box. He gives 10 apples to his sister. "
        "How many apples does he have left?",
        "26",
    ),
    (
        "math",
        "A train travels at 60 kilometres per hour for 2 hours and then at 80 kilometres per hour "
        "for 1 hour. How far does it travel in total?",
        "200",
    ),
    (
        "math",
        "A shop sells pencils for 25 cents each. Maria buys 8 pencils and pays with a 5 dollar note. "
        "How much change does she get, in dollars?",
        "3",
    ),
    (
        "math",
        "There are 30 students in a class. Two fifths of them walk to school and the rest take the "
        "bus. How many students take the bus?",
        "18",
    ),
    ("chat", "What are three tips for staying focused while studying?", None),
    ("chat", "Explain what a rainbow is to a seven-year-old.", None),
    ("chat", "Write a short, friendly email inviting a colleague to lunch on Friday.", None),
    ("chat", "What is the difference between weather and climate?", None),
]


@register_task("builtin", "12 prompts written for this project: summarization, math, chat (no files needed)")
def load_builtin(_: str | None, options: TaskOptions) -> list[Example]:
    """The built-in suite; ``builtin:math+chat`` selects categories."""
    return [
        Example(id=f"builtin-{i:02d}", category=cat, turns=(text,), reference=ref, source="builtin", task="builtin")
        for i, (cat, text, ref) in enumerate(_PROMPTS)
    ]
