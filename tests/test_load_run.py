"""``run --concurrency`` end to end on a tiny model: one record per (example, method, level),
batch-1's token ids at every level, resume by whole batches, and the report's load section.

The verify-cost curves are fixed (``fixed_costs``): measuring them takes seconds a level on a
busy machine, and a fixed curve makes every fitted choice the same from run to run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import harness.runner as runner
from harness.cli import main
from harness.metrics import crossovers, load_frame, lowest_level
from harness.results import read_records, record_key
from tasks.base import Example

LEVELS = (1, 2)
METHODS = ("vanilla", "pld")
LIMIT = 4
TURN_TIMES = ("ttft", "tpot", "arrival", "admitted", "first_token", "finished")


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--methods", "pld", "--limit", str(LIMIT), "--max-new-tokens", "8",
            "--dtype", "float32", "--device", "cpu", "--warmup", "0", "--concurrency", ",".join(map(str, LEVELS)),
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def fixed_costs() -> Iterator[None]:
    """Every verify-cost curve, one sequence or a batch, is this one: no measurement."""
    from methods.core import cost

    curve = cost.CostCurve((1, 2, 4, 8, 16, 32, 64), (1.0, 1.02, 1.05, 1.1, 1.3, 1.8, 3.0), 1.0, "fixed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cost, "_cost_curve", lambda engine, model_name, cache_dir, batch=1: curve)
        yield


@pytest.fixture(scope="module")
def load_run(tiny_model_dir: Path, tmp_path_factory, fixed_costs) -> Path:
    out = tmp_path_factory.mktemp("load") / "run"
    assert main(_argv(tiny_model_dir, out)) == 0
    return out


def test_a_load_run_records_each_example_method_and_level_once(load_run, capsys):
    records = read_records(load_run / "results.jsonl")
    keys = [record_key(r) for r in records]
    ids = sorted({r["example_id"] for r in records})
    assert len(ids) == LIMIT and len(keys) == len(set(keys)) == LIMIT * len(METHODS) * len(LEVELS)
    assert set(keys) == {("builtin", i, m, level) for i in ids for m in METHODS for level in LEVELS}
    for r in records:
        assert not r["skipped"] and len(r["turns"]) == 1  # one request: the first turn
        turn = r["turns"][0]
        assert all(isinstance(turn[k], float) for k in TURN_TIMES)
        # a closed loop: a request is sent when a slot takes it, and its times count from there
        assert turn["arrival"] == turn["admitted"] <= turn["first_token"] <= turn["finished"]
        assert r["wall_time"] == turn["wall_time"] == pytest.approx(turn["finished"] - turn["admitted"])
        assert turn["ttft"] == pytest.approx(turn["first_token"] - turn["admitted"])
        assert sum(turn["accepted"]) == len(turn["tokens"]) == r["new_tokens"]
        load = r["load"]  # its chunk's: a closed loop serves one batch of requests per chunk, methods alternating
        assert load["requests"] == r["concurrency"] and load["request_rate"] is None and load["steps"] > 0
        assert 1 <= load["mean_batch"] <= r["concurrency"]
        assert load["output_tokens"] == sum(len(o["turns"][0]["tokens"]) for o in records
                                            if (o["method"], o["concurrency"], o["load"]["chunk"])
                                            == (r["method"], r["concurrency"], load["chunk"]))
        assert load["throughput"] == pytest.approx(load["output_tokens"] / load["wall_time"])
        assert load["memory"]["kv_cache_bytes"] > 0 and "peak_rss_bytes" in load["memory"]
    for level in LEVELS:  # every method served the same chunks, each paired with vanilla's
        chunks = {m: {r["load"]["chunk"] for r in records if (r["method"], r["concurrency"]) == (m, level)}
                  for m in METHODS}
        assert len(chunks["vanilla"]) == LIMIT // level and chunks["pld"] == chunks["vanilla"]
    manifest = json.loads((load_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["identity"]["concurrency"] == list(LEVELS)


def test_greedy_tokens_under_load_are_those_of_one_request_at_a_time(load_run):
    records = read_records(load_run / "results.jsonl")
    tokens = {(r["method"], r["example_id"], r["concurrency"]): r["turns"][0]["tokens"] for r in records}
    for method in METHODS:
        for (m, example, level), ids in tokens.items():
            if m == method:
                assert ids == tokens[(method, example, 1)], f"{method} at {level} on {example}"
    assert any(a > 1 for r in records if r["method"] == "pld" for a in r["turns"][0]["accepted"])  # pld drafted


def test_a_rerun_redoes_nothing_and_a_lost_record_reruns_only_its_batch(load_run, tiny_model_dir, tmp_path,
                                                                        monkeypatch, fixed_costs):
    out = tmp_path / "run"
    shutil.copytree(load_run, out)
    results = out / "results.jsonl"
    before = results.read_bytes()
    served: list[tuple[str, int]] = []
    real = runner._fit_level

    def spy(decoder: Any, *args: Any, **kwargs: Any) -> Any:
        served.append((runner.label_of(decoder), args[2]))  # (method, level)
        return real(decoder, *args, **kwargs)

    monkeypatch.setattr(runner, "_fit_level", spy)
    assert main(_argv(tiny_model_dir, out)) == 0
    assert served == [] and results.read_bytes() == before

    lines = before.decode().splitlines(keepends=True)
    lost = next(i for i, line in enumerate(lines) if (json.loads(line)["method"], json.loads(line)["concurrency"])
                == ("pld", 2))
    key = record_key(json.loads(lines[lost]))
    results.write_text("".join(lines[:lost] + lines[lost + 1:]))
    assert main(_argv(tiny_model_dir, out)) == 0
    assert served == [("pld", 2)]  # the whole batch served again: the load must be the one measured
    after = read_records(results)
    assert len(after) == len(lines) and record_key(after[-1]) == key  # and only the lost record emitted
    assert after[-1]["turns"][0]["tokens"] == json.loads(lines[lost])["turns"][0]["tokens"]


def test_divergences_are_judged_against_vanilla_at_the_same_level(load_run):
    """The run's divergence file is empty (float32, greedy); each record was paired at its own level,
    which ``tests/test_divergence.py`` checks with records that differ between levels."""
    assert (load_run / "divergences.jsonl").read_text() == ""


def test_the_report_has_the_load_section_and_the_rest_reads_the_lowest_level(load_run, capsys):
    from harness.report import build_report
    from harness.summary import print_summary

    page = build_report(load_run).read_text()
    assert 'id="load-table"' in page and "Under load" in page
    for method in METHODS:  # both charts draw every method
        assert f'id="throughput-tpot-series-{method}"' in page
    assert 'id="speedup-concurrency-series-pld"' in page
    table = page.split('id="load-table"')[1].split("</table>")[0]
    assert table.count("<tr") == 1 + len(METHODS) * len(LEVELS)
    summary = page.split('id="summary-box"')[1].split("</table>")[0]
    assert f"<td>{LIMIT}</td>" in summary and f"<td>{LIMIT * len(LEVELS)}</td>" not in summary
    print_summary(load_run)
    out = capsys.readouterr().out
    assert "Under load" in out and "Under 1.05x from concurrency" in out


def _load_record(method: str, example: str, level: int, throughput: float, **turn: Any) -> dict[str, Any]:
    times = {"ttft": 0.1, "tpot": 0.01, "arrival": 0.0, "admitted": 0.0, "first_token": 0.1, "finished": 1.0, **turn}
    return {"task": "t", "example_id": example, "method": method, "concurrency": level, "skipped": None,
            "new_tokens": 10, "wall_time": 1.0, "target_forwards": 10,
            "turns": [{"tokens": list(range(10)), "text": "x", "accepted": [1] * 10, "draft_sizes": [0] * 10,
                       "wall_time": 1.0, **times}],
            "load": {"wall_time": 20.0 / throughput, "output_tokens": 20, "throughput": throughput, "steps": 10,
                     "mean_batch": level, "processed_per_step": level, "accepted_per_step": level,
                     "memory": {"kv_cache_bytes": 100 * level, "peak_rss_bytes": 1000}, "choice": {}}}


def test_load_metrics_pair_each_level_with_vanilla_s_and_find_the_crossover():
    records = [_load_record(m, e, level, tps) for m, level, tps in
               [("vanilla", 1, 10.0), ("vanilla", 2, 18.0), ("vanilla", 4, 30.0),
                ("m", 1, 20.0), ("m", 2, 18.5), ("m", 4, 24.0), ("k", 1, 30.0), ("k", 2, 40.0), ("k", 4, 60.0)]
               for e in ("a", "b")]
    frame = load_frame(records).set_index(["method", "concurrency"])
    assert frame.loc[("m", 1), "speedup"] == pytest.approx(2.0)
    assert frame.loc[("m", 2), "speedup"] == pytest.approx(18.5 / 18.0)
    assert frame.loc[("k", 4), "throughput"] == pytest.approx(60.0)
    assert frame.loc[("m", 4), "requests"] == 2 and frame.loc[("m", 4), "kv_cache_bytes"] == 400
    assert crossovers(load_frame(records)) == {"m": 2, "k": None}  # m: 1.03x at 2, under 1.05x
    assert {r["concurrency"] for r in lowest_level(records)} == {1}
    plain = [{k: v for k, v in r.items() if k not in ("concurrency", "load")} for r in records]
    assert lowest_level(plain) == plain and load_frame(plain).empty


def test_chunked_levels_pair_each_chunk_with_vanilla_s():
    """Where the methods took turns chunk by chunk, the speedup is the geometric mean of the per-chunk
    ratios, not the ratio of sums: vanilla's slow second chunk (the machine drifting) cancels."""
    def chunked(method: str, example: str, chunk: str, throughput: float) -> dict[str, Any]:
        record = _load_record(method, example, 2, throughput)
        record["load"] = {**record["load"], "chunk": chunk}
        return record

    records = [chunked("vanilla", "a", "t:a", 10.0), chunked("vanilla", "b", "t:b", 5.0),
               chunked("m", "a", "t:a", 12.0), chunked("m", "b", "t:b", 5.0)]
    frame = load_frame(records).set_index(["method", "concurrency"])
    assert frame.loc[("m", 2), "speedup"] == pytest.approx(1.2 ** 0.5)  # the ratio of sums would be 1.059
    assert frame.loc[("m", 2), "throughput"] == pytest.approx(40 / (20 / 12 + 20 / 5.0))
    unpaired = [r for r in records if r["load"]["chunk"] != "t:b" or r["method"] == "m"]  # vanilla lacks a chunk
    frame = load_frame(unpaired).set_index(["method", "concurrency"])
    assert frame.loc[("m", 2), "speedup"] == pytest.approx(frame.loc[("m", 2), "throughput"] / 10.0)


def test_open_loop_arrivals_are_seeded_per_level_and_the_same_for_every_method():
    """A request rate gives every method at a level the same Poisson arrivals, recorded per request."""
    from methods.core.engine import Engine
    from methods.pld import PromptLookupDecoder
    from methods.vanilla import VanillaDecoder
    from tests.conftest import tiny_model

    first = runner.poisson_arrivals(200, 50.0, 0, 2)
    assert first[0] == 0.0 and first == runner.poisson_arrivals(200, 50.0, 0, 2)
    assert first != runner.poisson_arrivals(200, 50.0, 0, 4) and first != runner.poisson_arrivals(200, 50.0, 1, 2)
    assert 0.015 < first[-1] / 199 < 0.025  # exponential gaps of mean 1/50 s
    assert runner.poisson_arrivals(3, None, 0, 2) == [None, None, None]  # closed: each arrives when admitted

    engine = Engine(tiny_model("llama"), capacity=64)
    decoders = [VanillaDecoder(engine), PromptLookupDecoder(engine, policy="fixed")]
    for d in decoders:
        d.label = d.name
    tok = SimpleNamespace(decode=lambda ids, **kw: " ".join(map(str, ids)))
    examples = [Example(f"e{i}", "chat", [f"prompt {i}"], task="t") for i in range(3)]
    records: list[dict[str, Any]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "encode_conversation", lambda tokenizer, messages: [5, 6, 7, len(messages[0]["content"])])
        runner.run_load(examples, decoders, tok, runner.ShardSettings(6, [], None), [2], 40.0, records.append,
                        warmup=0)
    want = runner.poisson_arrivals(3, 40.0, 0, 2)
    for method in ("vanilla", "pld"):
        mine = [r for r in records if r["method"] == method]
        assert [r["turns"][0]["arrival"] for r in mine] == want
        for r in mine:  # in an open loop a request's times count from its arrival
            turn = r["turns"][0]
            assert turn["wall_time"] == pytest.approx(turn["finished"] - turn["arrival"])
            assert r["load"]["request_rate"] == 40.0
