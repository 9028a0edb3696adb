"""Bad input, table-driven: every case exits 2 with one line on stderr and no traceback.

Each row is something a new user could plausibly type or hand over (a UTF-16 export, a
manifest edited into a list, ``report -o`` into a folder that does not exist, a task
option with a typo). None of them needs the model weights: every check runs before the
model loads, which is also what the cases assert by finishing in seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.cli import main

PROC_FILE = Path("/proc/version")  # exists, and cannot be written even by root


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def _turn() -> dict:
    return {"tokens": [1, 2, 3], "text": "a b c", "wall_time": 0.5, "accepted": [1, 1, 1],
            "draft_sizes": [0, 0, 0], "draft_time": None, "verify_time": None}


def _record(method: str = "vanilla", example: str = "x") -> dict:
    return {"task": "builtin", "example_id": example, "category": "chat", "method": method, "reference": None,
            "turns": [_turn()], "new_tokens": 3, "target_forwards": 3, "wall_time": 0.5}


def fake_run(path: Path, *, max_new_tokens: int = 16, pld_tokens: int = 3, manifest: object = None,
             records: bytes | None = None) -> Path:
    """A hand-made run folder (vanilla + pld), enough for report/baseline/check/compare."""
    path.mkdir(parents=True)
    if manifest is None:
        manifest = {"config": {"model": "smollm2-135m", "max_new_tokens": max_new_tokens, "temperature": 0.0,
                               "top_p": 1.0, "methods": ["vanilla", "pld"]},
                    "dtype": "float32", "environment": {"device": "cpu"}, "tasks": {"builtin": {"hash": "abc"}},
                    "method_options": {"vanilla": {}, "pld": {"num_tokens": pld_tokens}}}
    (path / "manifest.json").write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    if records is None:
        records = "".join(json.dumps(_record(m)) + "\n" for m in ("vanilla", "pld")).encode()
    (path / "results.jsonl").write_bytes(records)
    return path


@dataclass
class World:
    """Files for the table, made once per test in its tmp folder."""

    root: Path

    def p(self, name: str) -> str:
        return str(self.root / name)

    def file(self, name: str, data: bytes | str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def jsonl(self, name: str, rows: list[dict]) -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def run(self, name: str, **kw) -> str:
        return str(fake_run(self.root / name, **kw))

    def baseline(self, name: str = "base.json") -> str:
        out = self.root / name
        assert main(["baseline", self.run("base-run"), "-o", str(out)]) == 0
        return str(out)

    def model(self, name: str, config: dict | bytes | None, tokenizer: bool = True) -> str:
        """A model folder without weights: config and tokenizer are all the pre-load checks read."""
        folder = self.root / name
        folder.mkdir()
        if config is not None:
            (folder / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
        if tokenizer:
            from harness.models import model_source

            src = Path(model_source("smollm2-135m"))
            for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                if (src / f).is_file():
                    shutil.copy(src / f, folder / f)
        return str(folder)


TINY = {"model_type": "llama", "max_position_embeddings": 64, "vocab_size": 49152, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
BINARY = bytes(range(255, -1, -1)) * 4  # starts with 0xff: not UTF-8 from the first byte
UTF16_ROW = '{"prompt": "hello"}\n'.encode("utf-16")
LATIN1_ROW = '{"prompt": "café"}\n'.encode("latin-1")

Case = tuple[str, Callable[[World], list[str]], str]

RUN: list[Case] = [
    # task files: decoding, shape, duplicates
    ("jsonl utf-16", lambda w: ["--tasks", "jsonl:" + w.file("u16.jsonl", UTF16_ROW)], "UTF-16 or binary"),
    ("jsonl latin-1", lambda w: ["--tasks", "jsonl:" + w.file("l1.jsonl", LATIN1_ROW)], "l1.jsonl:1: cannot decode"),
    ("jsonl binary", lambda w: ["--tasks", "jsonl:" + w.file("b.jsonl", BINARY)], "b.jsonl:1: cannot decode"),
    ("jsonl list row", lambda w: ["--tasks", "jsonl:" + w.file("l.jsonl", '["a"]\n')], "expected a JSON object, got a JSON list"),
    ("jsonl duplicate id", lambda w: ["--tasks", "jsonl:" + w.jsonl("d.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])],
     "lines 1 and 2 both have id '1'"),
    ("jsonl id clashes with a line number",
     lambda w: ["--tasks", "jsonl:" + w.jsonl("d2.jsonl", [{"id": 2, "prompt": "a"}, {"prompt": "b"}])],
     "lines 1 and 2 both have id '2'"),
    ("gsm8k utf-16", lambda w: ["--tasks", "gsm8k", "--task-path", "gsm8k=" + w.file("g.jsonl", UTF16_ROW)], "g.jsonl:1: cannot decode"),
    ("mt_bench duplicate question_id", lambda w: ["--tasks", "mt_bench", "--task-path", "mt_bench=" + w.jsonl(
        "q.jsonl", [{"question_id": 7, "category": "c", "turns": ["a"]}] * 2)], "lines 1 and 2 both have id '7'"),
    ("xsum duplicate id", lambda w: ["--tasks", "xsum", "--task-path", "xsum=" + w.jsonl(
        "x.jsonl", [{"id": "a", "document": "d", "summary": "s"}] * 2)], "lines 1 and 2 both have id 'a'"),
    ("task file is a folder", lambda w: ["--tasks", "gsm8k", "--task-path", "gsm8k=" + str(w.root)], "no such file"),
    # task specs and task options
    ("empty task list", lambda w: ["--tasks", ","], "no tasks given"),
    ("--costs-from a missing file", lambda w: ["--costs-from", w.p("nowhere.json")], "no such file"),
    ("--costs-from a file without costs", lambda w: ["--costs-from", w.file("c.json", '{"a": 1}')],
     "holds no cost record"),
    ("repeated task spec", lambda w: ["--tasks", "builtin:math,builtin:math"], "names 'builtin:math' twice"),
    ("overlapping task specs", lambda w: ["--tasks", "builtin,builtin:math"], "both select example builtin-04"),
    ("same jsonl file twice", lambda w: ["--tasks", f"jsonl:{w.jsonl('s.jsonl', [{'prompt': 'a'}])},jsonl:{w.root}/./s.jsonl"],
     "twice"),
    ("misspelt task option", lambda w: ["--tasks", "jsonl:" + w.jsonl("o.jsonl", [{"prompt": "a"}]),
                                        "--task-option", "jsonl.promt=q"],
     "unknown option jsonl.promt; valid options for jsonl: prompt, reference, id, category"),
    ("task option without suite", lambda w: ["--task-option", "max_words=5"], "expects SUITE.KEY=VALUE"),
    ("task option for a task not run", lambda w: ["--task-option", "xsum.max_words=5"], "which is not in --tasks"),
    ("task option for unknown suite", lambda w: ["--task-option", "nosuch.x=1"], "unknown task 'nosuch'"),
    ("task option not an integer", lambda w: ["--tasks", "xsum", "--task-option", "xsum.max_words=lots"],
     "bad value for xsum.max_words: expected an integer, got 'lots'"),
    ("task option below its minimum", lambda w: ["--tasks", "xsum", "--task-option", "xsum.max_words=0"],
     "below the minimum 1"),
    ("task path for unknown suite", lambda w: ["--task-path", "nosuch=x.jsonl"], "unknown task 'nosuch'"),
    ("task path for a fileless suite", lambda w: ["--task-path", "builtin=x.jsonl"], "reads no data file"),
    ("task path for a suite not run", lambda w: ["--task-path", "gsm8k=x.jsonl"], "which is not in --tasks"),
    # methods and options
    ("medusa tree of 100000 nodes", lambda w: ["--methods", "medusa", "--method-option", "medusa.tree=100000"],
     "more than 512 nodes"),
    ("medusa heads path is a text file", lambda w: ["--methods", "medusa", "--method-option",
                                                    "medusa.heads=" + w.file("heads.txt", "x")], "is not a checkpoint"),
    ("medusa heads folder is empty", lambda w: ["--methods", "medusa", "--method-option",
                                                "medusa.heads=" + str(w.root)], "has no heads.safetensors"),
    ("medusa tree file is utf-16", lambda w: ["--methods", "medusa", "--method-option",
                                              "medusa.tree=" + w.file("t.json", "[[0]]".encode("utf-16"))], "cannot decode"),
    ("misspelt method option", lambda w: ["--methods", "medusa", "--method-option", "medusa.hedas=x"],
     "unknown option medusa.hedas"),
    ("eagle: both names of one option disagree", lambda w: ["--methods", "eagle@depth=5@upstream_depth=5"],
     "eagle.depth=5 and eagle.upstream_depth=5 set depth to 5 and 6 (depth = upstream_depth + 1); give one of the two names"),
    ("eagle: both names disagree run-wide", lambda w: ["--methods", "eagle", "--method-option", "eagle.top_k=10",
                                                       "--method-option", "eagle.topk=4"], "give one of the two names"),
    ("eagle: unknown preset", lambda w: ["--methods", "eagle@preset=eagle3"],
     "unknown preset eagle.preset=eagle3; valid presets for eagle: upstream"),
    ("eagle: upstream depth out of range", lambda w: ["--methods", "eagle", "--method-option", "eagle.upstream_depth=12"],
     "bad value for eagle.upstream_depth: 12 is above the maximum 11 (depth = upstream_depth + 1)"),
    ("eagle: upstream total_token out of range", lambda w: ["--methods", "eagle@total_token=0"],
     "bad value for eagle.total_token: 0 is below the minimum 2"),
    ("pld negative tokens", lambda w: ["--methods", "pld", "--method-option", "pld.num_tokens=-4"], "below the minimum"),
    ("float option nan", lambda w: ["--methods", "self_spec", "--method-option", "self_spec.threshold=nan"],
     "expected a finite number"),
    ("self_spec rule misspelt", lambda w: ["--methods", "self_spec@rule=papers"], "'papers' is not one of ours, paper"),
    ("self_spec paper beta above 1", lambda w: ["--methods", "self_spec@rule=paper@beta2=1.5"],
     "bad value for self_spec.beta2: 1.5 is above the maximum 1.0"),
    ("lookahead init misspelt", lambda w: ["--methods", "lookahead@init=hao"], "'hao' is not one of ours, upstream"),
    ("lookahead upstream init with ngram 2", lambda w: ["--methods", "lookahead@init=upstream@ngram=2"],
     "init=upstream needs ngram >= 3"),
    ("lookahead upstream init with a tuned file", lambda w: [
        "--methods", "lookahead@init=upstream", "--method-option",
        "lookahead.tuned=" + w.file("la.json", '{"window": 1, "ngram": 3, "guesses": 1}')],
     "init=upstream takes no tuned file"),
    ("temperature nan", lambda w: ["--temperature", "nan"], "expected a finite number"),
    ("zero timing repeats", lambda w: ["--repeats", "0"], "--repeats must be a positive integer, got 0"),
    # load: --concurrency and --request-rate
    ("concurrency level zero", lambda w: ["--concurrency", "1,0"],
     "--concurrency takes positive integers like 1,4,16, got 1,0"),
    ("concurrency level negative", lambda w: ["--concurrency", "-4"],
     "--concurrency takes positive integers like 1,4,16, got -4"),
    ("concurrency level not an integer", lambda w: ["--concurrency", "1,2.5"],
     "--concurrency takes positive integers like 1,4,16, got '1,2.5'"),
    ("concurrency with an empty level", lambda w: ["--concurrency", "1,,4"],
     "--concurrency takes positive integers like 1,4,16, got '1,,4'"),
    ("concurrency level repeated", lambda w: ["--concurrency", "1,4,4"],
     "--concurrency lists level 4 more than once (1,4,4)"),
    ("request rate zero", lambda w: ["--concurrency", "4", "--request-rate", "0"],
     "--request-rate must be a positive finite number of requests per second, got 0.0"),
    ("request rate negative", lambda w: ["--concurrency", "4", "--request-rate", "-2"],
     "--request-rate must be a positive finite number of requests per second, got -2.0"),
    ("request rate infinite", lambda w: ["--concurrency", "4", "--request-rate", "inf"],
     "argument --request-rate: expected a finite number, got 'inf'"),
    ("request rate without concurrency", lambda w: ["--request-rate", "2"], "--request-rate needs --concurrency"),
    ("concurrency with repeats", lambda w: ["--concurrency", "4", "--repeats", "3"],
     "--repeats 3 is not supported under load (--concurrency)"),
    ("concurrency above the examples selected", lambda w: ["--methods", "vanilla", "--concurrency", "1,4",
                                                          "--tasks", "builtin:math", "--limit", "3"],
     "--concurrency 4 is more than the 3 examples selected (--limit 3 per task)"),
    ("concurrency above a shard's examples", lambda w: ["--methods", "vanilla", "--concurrency", "3",
                                                       "--tasks", "builtin", "--limit", "4", "--shard", "1/2"],
     "--concurrency 3 is more than the 2 examples selected in shard 1/2 (--limit 4 per task)"),
    # model folders and context
    ("model config without model_type", lambda w: ["--model", w.model("m1", {"hidden_size": 16})], "has no 'model_type'"),
    ("model config of unknown type", lambda w: ["--model", w.model("m2", {"model_type": "gpt2"})], "is of type 'gpt2'"),
    ("model config is binary", lambda w: ["--model", w.model("m3", BINARY)], "config.json: cannot decode"),
    ("model config is a list", lambda w: ["--model", w.model("m4", b"[]")], "expected a JSON object, got a JSON list"),
    ("model folder without tokenizer", lambda w: ["--model", w.model("m5", TINY, tokenizer=False), "--max-new-tokens", "4"],
     "no usable tokenizer"),
    ("max-new-tokens beyond the context", lambda w: ["--model", w.model("m6", TINY), "--max-new-tokens", "100"],
     "does not fit the model's context of 64 tokens"),
    ("every prompt longer than the context", lambda w: ["--model", w.model("m7", TINY), "--max-new-tokens", "8",
                                                        "--tasks", "jsonl:" + w.jsonl("long.jsonl", [{"prompt": "word " * 200}])],
     "every prompt is too long"),
    ("max-new-tokens beyond the default model's context", lambda w: ["--max-new-tokens", "100000"],
     "does not fit the model's context of"),
    # run folders to resume
    ("resume: manifest is a list", lambda w: ["--out", w.run("r1", manifest=[1, 2])], "expected a JSON object, got a JSON list"),
    ("resume: manifest is utf-16", lambda w: ["--out", w.run("r2", manifest='{"config": {}}'.encode("utf-16"))],
     "cannot decode"),
    ("resume: manifest config is a string", lambda w: ["--out", w.run("r3", manifest={"config": "x"})],
     "'config' should be a JSON object"),
]

REPORT: list[Case] = [
    ("report: manifest is a list", lambda w: ["report", w.run("r", manifest=[])], "got a JSON list"),
    ("report: manifest is binary", lambda w: ["report", w.run("r", manifest=BINARY)], "manifest.json: cannot decode"),
    ("report: manifest config is null", lambda w: ["report", w.run("r", manifest={"config": None})],
     "'config' should be a JSON object, got null"),
    ("report: manifest tasks is a list", lambda w: ["report", w.run("r", manifest={"tasks": []})], "'tasks' should be a JSON object"),
    ("report: results are binary", lambda w: ["report", w.run("r", records=BINARY + b"\n")], "results.jsonl:1: cannot decode"),
    ("report: results are utf-16", lambda w: ["report", w.run("r", records=(json.dumps(_record()) + "\n").encode("utf-16"))],
     "results.jsonl:1: cannot decode"),
    ("report: record is a list", lambda w: ["report", w.run("r", records=b"[1, 2]\n")], "results.jsonl:1: expected a JSON object"),
    ("report: record lacks keys", lambda w: ["report", w.run("r", records=b'{"task": "builtin"}\n')], "record lacks 'example_id'"),
    ("report: turn lacks tokens", lambda w: ["report", w.run("r", records=(json.dumps(
        {**_record(), "turns": [{"text": "a"}]}) + "\n").encode())], "turn 1 lacks 'tokens'"),
    ("report: new_tokens is a string", lambda w: ["report", w.run("r", records=(json.dumps(
        {**_record(), "new_tokens": "3"}) + "\n").encode())], "'new_tokens' should be an integer"),
    ("report: a record twice", lambda w: ["report", w.run("r", records=(json.dumps(_record()) + "\n").encode() * 2)],
     "lines 1 and 2 both hold vanilla on builtin example x"),
    ("report: divergences are binary", lambda w: ["report", _with(w.run("r"), "divergences.jsonl", BINARY)],
     "divergences.jsonl:1: cannot decode"),
    ("report: FIRP analysis is a list", lambda w: ["report", _with(w.run("r", manifest={"config": {
        "methods": ["vanilla", "firp"]}}), "firp_analysis.json", b"[]")], "firp_analysis.json: expected a JSON object"),
    ("report -o into a missing folder", lambda w: ["report", w.run("r"), "-o", w.p("nowhere/report.html")],
     "does not exist; create it first"),
    ("report -o is a folder", lambda w: ["report", w.run("r"), "-o", str(w.root)], "is a folder; give a file name"),
    ("report -o cannot be written", lambda w: ["report", w.run("r"), "-o", str(PROC_FILE)], "cannot be written"),
    ("report -o under a file", lambda w: ["report", w.run("r"), "-o", w.file("f", "x") + "/r.html"], "is a file, not a folder"),
]

COMPARE: list[Case] = [
    ("compare: different max-new-tokens", lambda w: ["compare", w.run("a"), w.run("b", max_new_tokens=8), "-o", w.p("c.html")],
     "max_new_tokens 16 vs 8"),
    ("compare: different method options", lambda w: ["compare", w.run("a"), w.run("b", pld_tokens=5), "-o", w.p("c.html")],
     "options of pld"),
    ("compare: results are binary", lambda w: ["compare", w.run("a"), w.run("b", records=BINARY + b"\n"), "-o", w.p("c.html")],
     "cannot decode"),
    ("compare -o into a missing folder", lambda w: ["compare", w.run("a"), w.run("b"), "-o", w.p("no/c.html")],
     "does not exist"),
    ("compare -o cannot be written", lambda w: ["compare", w.run("a"), w.run("b"), "-o", str(PROC_FILE)], "cannot be written"),
]

BASELINE: list[Case] = [
    ("baseline -o into a missing folder", lambda w: ["baseline", w.run("a"), "-o", w.p("no/b.json")], "does not exist"),
    ("baseline -o is a folder", lambda w: ["baseline", w.run("a"), "-o", str(w.root)], "is a folder"),
    ("baseline -o cannot be written", lambda w: ["baseline", w.run("a"), "-o", str(PROC_FILE)], "cannot be written"),
    ("baseline: manifest is a list", lambda w: ["baseline", w.run("a", manifest=[]), "-o", w.p("b.json")], "got a JSON list"),
    ("baseline: record lacks keys", lambda w: ["baseline", w.run("a", records=b'{"method": "vanilla"}\n'), "-o",
                                               w.p("b.json")], "record lacks 'task'"),
]

CHECK: list[Case] = [
    ("check: baseline is binary", lambda w: ["check", w.run("a"), "--baseline", w.file("b.json", BINARY)], "cannot decode"),
    ("check: baseline is utf-16", lambda w: ["check", w.run("a"), "--baseline", w.file("b.json", '{"format": 1}'.encode("utf-16"))],
     "cannot decode"),
    ("check: baseline is a list", lambda w: ["check", w.run("a"), "--baseline", w.file("b.json", "[]")],
     "is not a specdec-harness baseline"),
    ("check: baseline entry metric is a string", lambda w: ["check", w.run("a"), "--baseline", _edit_baseline(
        w, lambda b: b["entries"][0].update(exact_match="high"))], "not a number"),
    ("check: baseline generation is a list", lambda w: ["check", w.run("a"), "--baseline", _edit_baseline(
        w, lambda b: b.update(generation=[]))], "'generation' should be a JSON object"),
    ("check: baseline is a folder", lambda w: ["check", w.run("a"), "--baseline", str(w.root)], "is a folder"),
    ("check: run's manifest is a list", lambda w: ["check", w.run("a", manifest=[]), "--baseline", w.baseline()],
     "got a JSON list"),
    ("check: different max-new-tokens", lambda w: ["check", w.run("a", max_new_tokens=8), "--baseline", w.baseline()],
     "max_new_tokens 16 vs 8"),
    ("check: different method options", lambda w: ["check", w.run("a", pld_tokens=5), "--baseline", w.baseline()],
     "options of pld"),
    ("check: tolerance not a number", lambda w: ["check", w.run("a"), "--baseline", w.baseline(), "--tol-rouge2", "abc"],
     "expected a number, got 'abc'"),
]


def _train(w: World, *extra: str) -> list[str]:
    """``train medusa`` on a valid training file: only ``extra`` is wrong."""
    data = w.jsonl("train.jsonl", [{"id": 1, "question": "What is 2 + 2?", "answer": "4"}])
    return ["train", "medusa", "--data", data, "--out", w.p("heads"), *extra]


TRAIN: list[Case] = [  # refused before the model loads or any distillation starts
    ("train: epochs 0", lambda w: _train(w, "--epochs", "0"), "--epochs, --batch, --limit and --max-new-tokens must be positive"),
    ("train: negative self prompts", lambda w: _train(w, "--self-prompts", "-1"), "--self-prompts and --summary-prompts must be 0 or more"),
    ("train: negative max steps", lambda w: _train(w, "--max-steps", "-1"), "--max-steps must be 0 or more"),
    ("train: validation every 0 steps", lambda w: _train(w, "--eval-every", "0"),
     "--eval-every and --patience must be positive integers"),
    ("train: patience 0", lambda w: _train(w, "--patience", "0"), "--eval-every and --patience must be positive integers"),
    ("train: learning rate 0", lambda w: _train(w, "--lr", "0"), "--lr must be a positive finite number, got 0.0"),
    ("train: learning rate nan", lambda w: _train(w, "--lr", "nan"), "expected a finite number, got 'nan'"),
    ("train: an unknown schedule", lambda w: _train(w, "--schedule", "linear"),
     "argument --schedule: invalid choice: 'linear' (choose from 'cosine', 'plateau')"),
    ("train: an lr factor of 1", lambda w: _train(w, "--lr-factor", "1"),
     "--lr-factor must lie between 0 and 1 and --max-lr-cuts be 0 or more, got 1 and 2"),
    ("train: negative lr cuts", lambda w: _train(w, "--max-lr-cuts", "-1"),
     "--lr-factor must lie between 0 and 1 and --max-lr-cuts be 0 or more, got 0.3 and -1"),
    ("train: init-from a missing folder", lambda w: _train(w, "--init-from", w.p("nowhere")), "no such folder"),
    ("train: a method with nothing to train", lambda w: ["train", "pld", "--data", w.p("x.jsonl"), "--out", w.p("o")],
     "nothing to train for method 'pld'"),
]

def _with(run_dir: str, name: str, data: bytes) -> str:
    (Path(run_dir) / name).write_bytes(data)
    return run_dir


def _edit_baseline(w: World, change: Callable[[dict], None]) -> str:
    path = Path(w.baseline("edited.json"))
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return str(path)


TABLE = [(name, lambda w, build=build: ["run", "--out", w.p("out"), *build(w)], expected)
         for name, build, expected in RUN] + REPORT + COMPARE + BASELINE + CHECK + TRAIN


@pytest.mark.parametrize("name,build,expected", TABLE, ids=[c[0] for c in TABLE])
def test_bad_input_table(name, build, expected, capsys, tmp_path):
    argv = build(World(tmp_path))
    capsys.readouterr()  # drop what building the fixtures printed
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err, err


def test_concurrency_refuses_a_method_that_cannot_batch(monkeypatch, capsys, tmp_path):
    """A decoder with ``batchable = False`` is refused under --concurrency, naming it and the methods that
    can batch; without --concurrency the same method runs as before."""
    from harness.config import RunConfig, validate
    from methods.registry import get_spec

    monkeypatch.setattr(get_spec("pld").decoder, "batchable", False)
    code, err = run_cli(["run", "--out", str(tmp_path / "out"), "--methods", "pld,lookahead", "--concurrency", "2"],
                        capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--concurrency: pld cannot decode batched yet" in err, err
    can = err.split("methods that can: ")[1].strip().split(", ")
    assert "pld" not in can and {"vanilla", "lookahead", "medusa"} <= set(can), err
    assert not (tmp_path / "out").exists()
    validate(RunConfig(methods=["pld"]))  # one request at a time: not refused


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), -1.0, 0])
def test_request_rate_must_be_positive_and_finite(rate):
    """The CLI's float parser already refuses nan and inf; a RunConfig built in code meets the same check."""
    from base.errors import UserError
    from harness.config import RunConfig, validate

    with pytest.raises(UserError, match="--request-rate must be a positive finite number"):
        validate(RunConfig(concurrency=[4], request_rate=rate))


def test_table_covers_every_command(tmp_path):
    commands = {}
    for i, (name, build, _) in enumerate(TABLE):
        (tmp_path / str(i)).mkdir()
        command = build(World(tmp_path / str(i)))[0]
        commands[command] = commands.get(command, 0) + 1
    assert len(TABLE) >= 40
    assert set(commands) == {"run", "report", "compare", "baseline", "check", "train"}, commands


def test_bad_run_leaves_no_run_folder(capsys, tmp_path):
    """Refused before any work: a typo does not leave an empty run folder behind."""
    w = World(tmp_path)
    code, _ = run_cli(["run", "--out", w.p("out"), "--model", w.model("m", TINY), "--max-new-tokens", "100"], capsys)
    assert code == 2 and not (tmp_path / "out").exists()


def test_refused_outputs_leave_no_file(capsys, tmp_path):
    """The writability probe removes what it created when the command then fails."""
    w = World(tmp_path)
    code, _ = run_cli(["baseline", w.run("a", manifest=[]), "-o", w.p("b.json")], capsys)
    assert code == 2 and not (tmp_path / "b.json").exists()


def test_ctrl_c_while_the_model_loads(monkeypatch, capsys, tmp_path):
    import harness.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.models, "load_model", interrupted)
    w = World(tmp_path)
    code, err = run_cli(["run", "--out", w.p("out"), "--model", w.model("m", {**TINY, "max_position_embeddings": 2048}),
                         "--max-new-tokens", "4", "--limit", "1"], capsys)
    assert code == 130
    lines = [line for line in err.splitlines() if line.strip()]  # the loading phase's status line, then one line saying what happened
    assert "Traceback" not in err and len(lines) == 2 and lines[0].startswith("loading ") and "interrupted" in lines[1]
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.slow
def test_duplicate_ids_never_change_a_metric(tmp_path, capsys):
    """Two rows of id 1 once paired vanilla with itself four ways (exact match 50%); now they are refused,
    and the same rows with unique ids give every example exactly one record and 100% exact match."""
    from harness.metrics import records_frame, summarize
    from harness.results import read_records

    rows = [{"id": 1, "key": "a", "prompt": "Name a colour."}, {"id": 1, "key": "b", "prompt": "Name a fruit."}]
    data = World(tmp_path).jsonl("dup.jsonl", rows)
    args = ["run", "--methods", "vanilla,pld", "--tasks", f"jsonl:{data}", "--max-new-tokens", "4", "--warmup", "0",
            "--device", "cpu", "--dtype", "float32"]
    code, err = run_cli([*args, "--out", str(tmp_path / "dup")], capsys)
    assert code == 2 and "lines 1 and 2 both have id '1'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "dup").exists()

    out = tmp_path / "unique"
    assert main([*args, "--task-option", "jsonl.id=key", "--out", str(out)]) == 0
    records = read_records(out / "results.jsonl")
    assert sorted((r["example_id"], r["method"]) for r in records) == [
        ("jsonl-a", "pld"), ("jsonl-a", "vanilla"), ("jsonl-b", "pld"), ("jsonl-b", "vanilla")]
    summary = summarize(records_frame(records), by=("method",)).set_index("method")
    assert summary.loc["vanilla", "exact_match"] == 1.0 and summary.loc["pld", "exact_match"] == 1.0
    assert summary.loc["vanilla", "examples"] == 2 and summary.loc["pld", "examples"] == 2


def test_settings_differ_names_each_difference():
    from harness.checks import settings_differ

    def ident(max_new_tokens=16, temperature=0.0, options=None):
        return {"generation": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": 1.0},
                "method_options": options or {"pld": {"num_tokens": 3}}}

    assert settings_differ(ident(), ident()) == []
    assert settings_differ(ident(), ident(max_new_tokens=8, temperature=0.5)) == [
        "max_new_tokens 16 vs 8", "temperature 0.0 vs 0.5"]
    assert settings_differ(ident(), ident(options={"pld": {"num_tokens": 5}})) == ["options of pld"]
    # a method only one run has is not a difference of settings (compare shows the common rows)
    assert settings_differ(ident(), ident(options={"pld": {"num_tokens": 3}, "medusa": {}})) == []


@pytest.mark.parametrize("command", ["check", "compare"])
def test_force_compares_runs_with_other_settings(command, capsys, tmp_path):
    w = World(tmp_path)
    other = w.run("other", max_new_tokens=8, pld_tokens=5)
    argv = (["check", other, "--baseline", w.baseline()] if command == "check"
            else ["compare", w.run("a"), other, "-o", w.p("c.html")])
    code, err = run_cli(argv, capsys)
    assert code == 2 and "max_new_tokens" in err and "options of pld" in err
    code, err = run_cli([*argv, "--force"], capsys)
    assert code == 0, err
