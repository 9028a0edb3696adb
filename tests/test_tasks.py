"""Task suites on fixture files of their own (every format), plus the shared reference data when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from methods.core.errors import UserError
from tasks.base import TaskOptions, load_task, select, task_hash
from tasks.gsm8k import extract_answer, reference_answer
from tasks.xsum import truncate_words


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    write_jsonl(d / "xsum/test.jsonl", [
        {"id": "1", "document": "word " * 500, "summary": "Many words."},
        {"id": "2", "document": "A short article.", "summary": "Short."},
    ])
    write_jsonl(d / "gsm8k/test.jsonl", [
        {"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
        {"question": "What is 1000+234?", "answer": "#### 1,234"},
    ])
    q = [{"question_id": 81 + i, "category": c, "turns": [f"Q{i}", f"Follow-up {i}"]}
         for i, c in enumerate(["writing", "math", "math"])]
    q[1]["reference"] = ["ref a", "ref b"]
    write_jsonl(d / "mt_bench/question.jsonl", q)
    write_jsonl(d / "spec_bench/question.jsonl", [
        {"question_id": 1, "category": "summarization", "turns": ["Sum this."]},
        {"question_id": 2, "category": "math_reasoning", "turns": ["Add."], "reference": "3"},
        {"question_id": 3, "category": "translation", "turns": ["Translate."]},
    ])
    return d


def opts(data_dir=None, **kw) -> TaskOptions:
    return TaskOptions(data_dir=data_dir, **kw)


def test_xsum(data_dir):
    ex = load_task("xsum", opts(data_dir))
    assert [e.id for e in ex] == ["xsum-1", "xsum-2"]
    assert ex[0].reference == "Many words." and ex[0].category == "summarization"
    assert ex[0].turns[0].startswith("Summarize the following article in one sentence.")
    assert ex[0].turns[0].endswith(" ...") and len(ex[0].turns[0].split()) < 420
    assert truncate_words("a b c", 2) == "a b ..." and truncate_words("a  b", 2) == "a b"


def test_xsum_truncation_option(data_dir):
    ex = load_task("xsum", opts(data_dir, extra={"xsum.max_words": "10"}))
    assert ex[0].turns[0].count("word") == 10


def test_gsm8k(data_dir):
    ex = load_task("gsm8k", opts(data_dir))
    assert ex[0].turns == ("What is 2+2?",) and ex[0].reference == "4"
    assert ex[1].reference == "1234"
    assert reference_answer("x\n#### 18") == "18"


@pytest.mark.parametrize("text,expected", [
    ("So she makes 9 * 2 = $18.\n#### 18", "18"),
    ("The answer is 1,234.", "1234"),
    ("She pays 3 and 4, so 7 in total", "7"),
    ("Result: 2.50 dollars", "2.5"),
    ("no number here", None),
])
def test_gsm8k_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_mt_bench_two_turns_and_categories(data_dir):
    ex = load_task("mt_bench", opts(data_dir))
    assert len(ex) == 3 and all(len(e.turns) == 2 for e in ex)
    assert ex[1].reference == "ref a\n\nref b"
    assert [e.id for e in load_task("mt_bench:math", opts(data_dir))] == ["mt_bench-82", "mt_bench-83"]


def test_spec_bench_categories(data_dir):
    ex = load_task("spec_bench:summarization+math_reasoning", opts(data_dir))
    assert [e.category for e in ex] == ["summarization", "math_reasoning"]
    assert ex[1].reference == "3"


def test_jsonl_with_chosen_fields(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"q": "Hello?", "gold": "Hi", "kind": "greet"},
        {"q": ["Turn one", "Turn two"], "kind": "chat"},
    ])
    extra = {"jsonl.prompt": "q", "jsonl.reference": "gold", "jsonl.category": "kind"}
    ex = load_task(f"jsonl:{path}", opts(extra=extra))
    assert ex[0].turns == ("Hello?",) and ex[0].reference == "Hi" and ex[0].id == "jsonl-1"
    assert ex[1].turns == ("Turn one", "Turn two") and ex[1].category == "chat"


def test_task_path_flag_covers_other_layouts(tmp_path, data_dir):
    ex = load_task("gsm8k", opts(paths={"gsm8k": data_dir / "gsm8k/test.jsonl"}))
    assert len(ex) == 2


def test_selection_is_deterministic_and_ordered():
    from tasks.base import Example

    items = [Example(str(i), "c", ("t",)) for i in range(50)]
    a, b = select(items, 7, 0), select(items, 7, 0)
    assert a == b and [int(e.id) for e in a] == sorted(int(e.id) for e in a)
    assert select(items, 7, 1) != a
    assert task_hash(a) == task_hash(b) != task_hash(select(items, 7, 1))


BAD = [
    ("missing file", lambda d: load_task("gsm8k", opts(d / "nowhere")), "no such file"),
    ("malformed line", "malformed", ":2: malformed JSON"),
    ("missing field", "missing", ":1: missing field 'answer'"),
    ("unknown category", lambda d: load_task("mt_bench:poetry", opts(d)), "unknown mt_bench category poetry; valid: math, writing"),
    ("empty selection", "empty", "selected no examples"),
    ("spec_bench without file", lambda d: load_task("spec_bench", opts()), "--task-path spec_bench=FILE"),
    ("jsonl missing", lambda d: load_task("jsonl:/no/such.jsonl", opts()), "no such file"),
    ("jsonl without path", lambda d: load_task("jsonl", opts()), "needs a file"),
]


@pytest.mark.parametrize("name,action,message", BAD, ids=[b[0] for b in BAD])
def test_bad_task_input(name, action, message, data_dir, tmp_path):
    if action == "malformed":
        p = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}, "{not json"])
        action = lambda d: load_task("gsm8k", opts(paths={"gsm8k": p}))  # noqa: E731
    elif action == "missing":
        p = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
        action = lambda d: load_task("gsm8k", opts(paths={"gsm8k": p}))  # noqa: E731
    elif action == "empty":
        p = write_jsonl(tmp_path / "empty.jsonl", [])
        action = lambda d: load_task("gsm8k", opts(paths={"gsm8k": p}))  # noqa: E731
    with pytest.raises(UserError) as err:
        action(data_dir)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_offline_hub_fallback_says_how_to_use_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as err:
        load_task("xsum", opts())
    assert "--data-dir" in str(err.value) and "xsum/test.jsonl" in str(err.value)


# -- the shared reference data, when present ------------------------------------------------
@pytest.mark.parametrize("suite,count", [("xsum", 700), ("gsm8k", 800), ("mt_bench", 80)])
def test_shared_data_formats(shared_data, suite, count):
    ex = load_task(suite, opts(shared_data))
    assert len(ex) == count
    assert all(e.turns and all(e.turns) for e in ex)


def test_shared_data_spec_bench_format_via_mt_bench_file(shared_data):
    ex = load_task("spec_bench:math", opts(paths={"spec_bench": shared_data / "mt_bench/question.jsonl"}))
    assert len(ex) == 10 and all(len(e.turns) == 2 for e in ex)


# -- several categories: '+' joins categories, ',' separates tasks (issue 16) ---------------
def test_several_categories_parse_and_load(data_dir):
    from tasks.base import split_tasks

    specs = split_tasks("spec_bench:summarization+math_reasoning,xsum")
    assert specs == ["spec_bench:summarization+math_reasoning", "xsum"]
    ex = load_task(specs[0], opts(data_dir))
    assert [e.category for e in ex] == ["summarization", "math_reasoning"]


def test_comma_between_categories_answers_with_the_plus_spelling(data_dir):
    from tasks.base import split_tasks

    with pytest.raises(UserError) as err:
        split_tasks("spec_bench:summarization,math_reasoning")
    assert "--tasks spec_bench:summarization+math_reasoning" in str(err.value)
    with pytest.raises(UserError) as err:  # the same mistake through the Python API
        load_task("spec_bench:summarization,math_reasoning", opts(data_dir))
    assert "spec_bench:summarization+math_reasoning" in str(err.value)
    assert split_tasks("builtin:math,xsum") == ["builtin:math", "xsum"]  # a real second suite still splits


def test_cli_help_shows_the_category_syntax(capsys):
    from harness.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    assert "spec_bench:summarization+math_reasoning" in " ".join(capsys.readouterr().out.split())
    args = build_parser().parse_args(["run", "--tasks", "spec_bench:summarization+math_reasoning,builtin"])
    assert args.tasks == ["spec_bench:summarization+math_reasoning", "builtin"]


def test_hub_without_datasets_names_the_hub_extra(monkeypatch):
    """Offline and without `datasets`: the error names the `hub` extra declared in pyproject.toml."""
    import builtins
    import tomllib

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError) as err:
        load_task("xsum", opts())
    message = str(err.value)
    assert 'pip install -e ".[hub]"' in message and "--data-dir" in message and "\n" not in message
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert any(dep.startswith("datasets") for dep in pyproject["project"]["optional-dependencies"]["hub"])
