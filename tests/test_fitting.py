"""Every method fits its draft to the machine's measured costs, and takes plain steps where no
draft is predicted to pay: a steep curve (a CPU without bf16 units, in bf16: an 8-token pass
costs 3.7 one-token passes) drafts less or not at all, a flat one (a GPU: 1.1 at 48 tokens)
drafts more, the fixed, published settings still draft as told, and every fitted variant
stays lossless."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import methods.core.cost as cost
from methods.core.cost import CostCurve
from methods.core.engine import Engine
from methods.core.fitting import Backoff, alpha_from_chain, best_option, best_prefix, chain_tokens, fitted
from methods.vanilla import VanillaDecoder
from tests.conftest import tiny_model

STEEP = CostCurve((1, 2, 4, 8), (1.0, 1.5, 2.2, 3.7))
FLAT = CostCurve((1, 48), (1.0, 1.1))
TABLE = [  # teacher-forced accepted lengths of the best tree of each size, as trainers write them
    {"size": 1, "expected_accepted_length": 1.40, "paths": [[0]]},
    {"size": 4, "expected_accepted_length": 1.77, "paths": [[0], [1], [0, 0], [2]]},
    {"size": 12, "expected_accepted_length": 2.06, "paths": [[i] for i in range(6)] + [[0, i] for i in range(6)]},
]
PROMPTS = [[1, 2, 3, 4], [5, 9, 5, 9, 5], [7, 7, 8]]


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """Pretend to run on a machine with the given pass curve and drafting costs (nothing is timed)."""
    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "cache"))

    def use(curve: CostCurve, call_cost: float = 0.0) -> None:
        monkeypatch.setattr(cost, "cost_curve", lambda engine, name, cache: curve)
        monkeypatch.setattr(cost, "relative_call_cost", lambda engine, fn, name: call_cost)
    return use


def lossless(decoder, engine, tokens: int = 20) -> list[list[int]]:
    """Each prompt's per-step draft sizes, after checking the tokens equal vanilla's."""
    sizes = []
    for prompt in PROMPTS:
        got = decoder.generate(prompt, tokens)
        assert got.tokens == VanillaDecoder(engine).generate(prompt, tokens).tokens
        sizes.append(got.draft_sizes[1:])
    return sizes


# -- the shared pieces ---------------------------------------------------------------------------
def test_chain_length_and_its_inverse():
    assert chain_tokens(0.5, 2) == pytest.approx(1.75) and chain_tokens(1.0, 3) == 4.0
    assert alpha_from_chain(chain_tokens(0.43, 4), 4) == pytest.approx(0.43, abs=1e-6)
    assert alpha_from_chain(0.5, 3) == pytest.approx(0.0, abs=1e-6)


def test_best_option_prefers_the_earlier_of_equal_rates():
    assert best_option([(0, 1.0, 1.0), (1, 2.0, 2.0), (2, 3.0, 2.0)]) == (2, 1.5)
    assert best_option([(0, 1.0, 1.0), (1, 2.0, 2.0)]) == (0, 1.0)


def test_best_prefix_verifies_nothing_when_no_node_pays():
    values = [0.9, 0.6, 0.3, 0.1]
    assert best_prefix(values, 0.0, FLAT)[0] == 4
    k, rate = best_prefix(values, 0.2, STEEP)
    assert 0 < k < 4 and rate == pytest.approx((1 + sum(values[:k])) / (0.2 + STEEP(k + 1)))
    assert best_prefix([0.2, 0.1], 0.3, STEEP) == (0, pytest.approx(1 / 1.3))
    assert best_prefix(values, 0.0, FLAT, scale=0.0)[0] == 0  # drafts never accepted: nothing pays


def test_fitted_record_says_whether_and_why():
    plain = fitted(0.88, "the 1-node tree")
    assert plain["drafting"] is False and plain["best_predicted_speedup"] == 0.88
    assert "plain steps" in plain["reason"] and "0.88x" in plain["reason"]
    assert fitted(1.2, "γ = 2")["drafting"] is True
    tie = fitted(1.02, "the 1-node tree")  # within the tie tolerance of a plain step: the plain step
    assert tie["drafting"] is False and "a tie" in tie["reason"] and "1.02x" in tie["reason"]
    assert fitted(1.04, "the 1-node tree")["drafting"] is True


def test_backoff_probes_after_doubling_waits_and_resets_when_drafting_pays():
    b = Backoff(first=2, most=8)
    answers = [b.plain(False) for _ in range(20)]
    probes = [i for i, plain in enumerate(answers) if not plain]
    assert probes == [2, 7, 16]  # after 2, then 4, then 8 plain steps
    assert b.plain(True) is False and [b.plain(False) for _ in range(3)] == [True, True, False]


# -- Medusa and FIRP: ``auto`` trees ------------------------------------------------------------
def _medusa(engine, tmp_path, **options):
    from methods.medusa import MedusaDecoder, MedusaHeads

    torch.manual_seed(0)
    heads = MedusaHeads(engine.config.hidden_size, engine.config.vocab_size, 2, "shared")
    folder = tmp_path / "heads"
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in heads.upstream_state_dict().items()}, str(folder / "heads.safetensors"))
    table = [{**t, "paths": [p[:2] for p in t["paths"]]} for t in TABLE]
    (folder / "config.json").write_text(json.dumps({"default_tree": "2x1", "tree_search": table}))
    return MedusaDecoder(engine, heads=str(folder), **options)


def _firp(engine, tmp_path, **options):
    from methods.firp import FirpDecoder, FirpMaps

    maps = FirpMaps(engine.config.hidden_size, [1, 1])
    folder = tmp_path / "firp"
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in maps.state_dict().items()}, str(folder / "firp.safetensors"))
    table = [{**t, "paths": [p[:2] for p in t["paths"]]} for t in TABLE]
    (folder / "config.json").write_text(json.dumps({**maps.config(), "default_tree": "2x1", "tree_search": table}))
    return FirpDecoder(engine, weights=str(folder), **options)


@pytest.mark.parametrize("make", [_medusa, _firp], ids=["medusa", "firp"])
def test_auto_trees_take_plain_steps_where_no_tree_pays(make, machine, tmp_path):
    engine = Engine(tiny_model("llama"))
    machine(STEEP, 0.1)  # the 1-node tree: 1.40 / (1.5 + 0.1) < 1
    plain = make(engine, tmp_path)
    info = plain.describe()
    assert info["fitted"]["drafting"] is False and info["fitted"]["best_predicted_speedup"] < 1
    assert info["draft_size"] == 0
    sizes = lossless(plain, engine)
    assert all(s == 0 for steps in sizes for s in steps), sizes
    # the published, always-drafting tree still drafts on the same machine
    trained = make(engine, tmp_path, tree="trained")
    assert "fitted" not in trained.describe()
    assert all(s == trained.tree.draft_size == 4 for steps in lossless(trained, engine) for s in steps)

    machine(FLAT, 0.1)  # a GPU: the 12-node table entry (trimmed to the heads' two levels) pays
    big = make(engine, tmp_path)
    assert big.describe()["fitted"]["drafting"] is True
    assert all(s == big.tree.draft_size > 4 for steps in lossless(big, engine) for s in steps)


# -- EAGLE ---------------------------------------------------------------------------------------
def _eagle(engine, tmp_path, sharpness: float = 400.0, **options):
    """A random head made confident (its features scaled up: peaked draft distributions)."""
    from methods.eagle import EagleDecoder
    from tests.test_eagle import random_head, save_head

    head = random_head(engine, seed=3)
    with torch.no_grad():
        head.layers[0].mlp.down_proj.weight.mul_(sharpness)
    config = {"val_accuracy": {"chain": {"steps": 3, "accepted_length": 2.4}}}
    return EagleDecoder(engine, head=save_head(head, tmp_path / "eagle", extra=config), **options)


def test_eagle_fits_levels_and_nodes_to_the_machine(machine, tmp_path):
    engine = Engine(tiny_model("llama"))
    machine(FLAT, 0.05)  # a GPU: head passes and verified tokens both cheap
    flat = _eagle(engine, tmp_path)
    assert flat.describe()["fitted"]["drafting"] is True and flat.describe()["draft_size"] == "fitted per step"
    first_flat = flat.generate(PROMPTS[0], 2).draft_sizes[1]
    machine(STEEP, 0.1)  # a CPU: every verified token dear
    steep = _eagle(engine, tmp_path)
    first_steep = steep.generate(PROMPTS[0], 2).draft_sizes[1]
    assert 0 < first_steep < first_flat, (first_flat, first_steep)
    assert first_flat > 4  # deeper than a chain of one level's top-k
    # the steep machine stops at fewer levels and verifies only the likeliest of the nodes it drafted
    assert steep.last_step["levels"] < flat.last_step["levels"], (steep.last_step, flat.last_step)
    assert steep.last_step["verified"] < steep.last_step["drafted"], steep.last_step

    machine(STEEP, 1.0)  # a head pass as dear as a target step: nothing pays, not even the prior's chain
    dear = _eagle(engine, tmp_path)
    assert dear.describe()["fitted"]["drafting"] is False
    sizes = lossless(dear, engine)
    drafted = sum(s > 0 for steps in sizes for s in steps)
    assert drafted <= 3 and sum(len(steps) for steps in sizes) > 30, sizes  # plain steps, the odd probe
    assert dear.backoff.plain_steps >= 30  # steps on which the head did not run at all
    # the published setting drafts its 16 nodes every step on the same machine
    fixed = _eagle(engine, tmp_path, total=16)
    assert "fitted" not in fixed.describe()
    assert all(s == 16 for steps in lossless(fixed, engine) for s in steps)


@pytest.mark.parametrize("curve,head_cost", [(FLAT, 0.05), (STEEP, 0.3), (STEEP, 1.0)])
def test_eagle_auto_is_lossless(machine, tmp_path, curve, head_cost):
    for kind in ("llama", "qwen2"):
        engine = Engine(tiny_model(kind))
        machine(curve, head_cost)
        decoder = _eagle(engine, tmp_path / kind)
        lossless(decoder, engine, 24)
        lossless(_eagle(engine, tmp_path / kind, sharpness=1.0), engine, 24)  # unconfident: mostly plain


def test_eagle_options_refuse_a_bad_total(tmp_path):
    from methods.core.errors import UserError
    from methods.eagle import EagleDecoder

    with pytest.raises(UserError, match="total must be auto or an integer"):
        EagleDecoder(Engine(tiny_model("llama")), head=str(tmp_path), total="big")


# -- SpS -----------------------------------------------------------------------------------------
def test_best_gamma_follows_the_curve_and_the_acceptance():
    from methods.sps.decoder import best_gamma

    assert best_gamma(0.6, 0.1, FLAT, 12)[0] == 3
    assert best_gamma(0.6, 0.05, STEEP, 12)[0] == 1
    gamma, rate = best_gamma(0.3, 0.3, STEEP, 12)
    assert gamma == 0 and rate == 1.0  # no draft pays: a plain step
    assert best_gamma(0.3, 0.3, STEEP, 12, least=1)[1] < 1.0


def _sps(engine, folder, **options):
    from methods.sps import SpsDecoder

    return SpsDecoder(engine, draft=str(folder), **options)


def test_sps_fits_gamma_to_the_machine(machine, tmp_path):
    model = tiny_model("llama")
    engine = Engine(model)
    model.save_pretrained(tmp_path / "self")  # the target as its own draft: every draft accepted
    machine(FLAT, 0.05)
    flat = _sps(engine, tmp_path / "self")
    assert flat.describe()["fitted"]["drafting"] is True and flat.describe()["gamma"] == "auto"
    flat_sizes = lossless(flat, engine, 40)
    machine(STEEP, 0.05)
    steep = _sps(engine, tmp_path / "self")
    steep_sizes = lossless(steep, engine, 40)
    assert steep_sizes[0][0] < flat_sizes[0][0], (steep_sizes, flat_sizes)  # at the prior α
    assert max(max(s) for s in flat_sizes) == 12  # α learnt near 1: the longest γ auto allows
    assert flat.acceptance() > 0.9

    other = tiny_model("llama", seed=5)  # a draft that is rarely right
    other.save_pretrained(tmp_path / "other")
    machine(STEEP, 0.3)
    plain = _sps(engine, tmp_path / "other")
    assert plain.describe()["fitted"]["drafting"] is False
    sizes = lossless(plain, engine, 40)
    assert sum(s > 0 for steps in sizes for s in steps) <= 6, sizes  # plain steps, a probe now and then
    assert plain.backoff.plain_steps > 60
    # a fixed gamma drafts as told on the same machine
    fixed = _sps(engine, tmp_path / "other", gamma=4)
    assert "fitted" not in fixed.describe()
    assert all(s == 4 for steps in lossless(fixed, engine, 40) for s in steps[:-4])  # then the room left


def test_sps_options_refuse_adaptive_without_a_gamma(tmp_path):
    from methods.core.errors import UserError

    with pytest.raises(UserError, match="adaptive starts from a fixed gamma"):
        _sps(Engine(tiny_model("llama")), tmp_path, adaptive=True)
    with pytest.raises(UserError, match="gamma must be auto or an integer"):
        _sps(Engine(tiny_model("llama")), tmp_path, gamma="many")


# -- Lookahead -----------------------------------------------------------------------------------
MIDDLE = CostCurve((1, 4, 8, 32), (1.0, 1.05, 1.3, 4.0))  # a CPU with bf16 units: a few tokens nearly free
SHAPES = {"candidates": [  # what the tuner records per shape: machine-free counts
    {"window": 1, "ngram": 2, "guesses": 1, "tokens": 120, "steps": 100, "mean_accepted_length": 1.2,
     "processed_per_step": 2.0, "processed_counts": {"2": 100}},
    {"window": 5, "ngram": 4, "guesses": 5, "tokens": 200, "steps": 100, "mean_accepted_length": 2.0,
     "processed_per_step": 27.0, "processed_counts": {"15": 20, "30": 80}},
], "window": 5, "ngram": 4, "guesses": 5}


def _lookahead_prompts() -> list[list[int]]:
    return [torch.randint(0, 15, (20,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]


def test_lookahead_prices_every_tuned_shape_on_this_machine(machine, tmp_path):
    from methods.lookahead import LookaheadDecoder
    from methods.lookahead.decoder import candidate_speedup

    row = SHAPES["candidates"][1]
    assert candidate_speedup(row, STEEP) == pytest.approx(200 / (20 * STEEP(16) + 80 * STEEP(31)))
    table = tmp_path / "shapes.json"
    table.write_text(json.dumps(SHAPES))
    engine = Engine(tiny_model("llama"))
    vanilla = VanillaDecoder(engine)
    shapes = {}
    for name, curve in (("flat", FLAT), ("middle", MIDDLE), ("steep", STEEP)):
        machine(curve)
        decoder = LookaheadDecoder(engine, tuned=str(table))
        shapes[name] = (decoder.W, decoder.N, decoder.G, decoder.drafting)
        info = decoder.describe()
        assert info["fitted"]["drafting"] == decoder.drafting
        assert info["shape_choice"]["candidates"][0]["predicted_speedup"] == info["fitted"]["best_predicted_speedup"]
        for prompt in _lookahead_prompts():
            got = decoder.generate(prompt, 24)
            assert got.tokens == vanilla.generate(prompt, 24).tokens
            assert (max(got.processed[1:]) > 0) == decoder.drafting  # plain steps feed nothing beyond the root
    assert shapes == {"flat": (5, 4, 5, True), "middle": (1, 2, 1, True), "steep": (1, 2, 1, False)}
    # the shape given by hand still drafts as told on the steep machine
    fixed = LookaheadDecoder(engine, tuned="none", window=5, ngram=4, guesses=5)
    assert "fitted" not in fixed.describe()
    for prompt in _lookahead_prompts():
        assert min(fixed.generate(prompt, 24).processed[1:]) >= 5  # every step feeds the window at least


def test_lookahead_auto_reads_the_table_before_an_older_per_device_shape(machine, tmp_path, monkeypatch):
    """An older tune result (one shape, its mean accepted length and pass size) is priced too;
    a table for the model and dtype wins over it."""
    import methods.lookahead.decoder as la
    from methods.lookahead import LookaheadDecoder

    monkeypatch.setattr(la, "TUNED_DIR", tmp_path)
    engine = Engine(tiny_model("llama"))
    older = {"window": 1, "ngram": 3, "guesses": 7, "mean_accepted_length": 1.39, "processed_per_step": 5.24}
    (tmp_path / "tiny-cpu-float32.json").write_text(json.dumps(older))
    machine(STEEP)  # 1.39 / t(6.24) < 1: plain steps
    decoder = LookaheadDecoder(engine, model_name="tiny")
    assert decoder.shape_from.endswith("tiny-cpu-float32.json") and decoder.drafting is False
    machine(MIDDLE)
    assert LookaheadDecoder(engine, model_name="tiny").drafting is True
    (tmp_path / "tiny-float32.json").write_text(json.dumps(SHAPES))
    machine(FLAT)
    decoder = LookaheadDecoder(engine, model_name="tiny")
    assert decoder.shape_from.endswith("tiny-float32.json") and (decoder.W, decoder.N, decoder.G) == (5, 4, 5)


def test_the_tuner_keeps_every_shapes_counts(tmp_path, monkeypatch):
    """The table the decoder prices: one row per shape tried, whose counts give back the
    tuner's own prediction on the tuning machine's curve."""
    from methods.core.training import Toolkit
    from methods.lookahead.decoder import candidate_speedup
    from methods.lookahead.tune import PRIORS, TuneConfig, tune_lookahead
    from tests.test_self_spec import _CharTokenizer

    model = tiny_model("llama")
    monkeypatch.setattr(cost, "cost_curve", lambda engine, name, cache: MIDDLE)
    kit = Toolkit(cache_dir=tmp_path, load_model=lambda *a, **k: (model, _CharTokenizer()),
                  training_prompts=lambda files, limit, seed: ["abcabcabcabc", "the cat the cat the cat"][:limit],
                  training_sequences=None, check_model=lambda name: None)
    result = tune_lookahead(TuneConfig(model="tiny", data=["train.jsonl"], out=str(tmp_path / "la.json"),
                                       trials=len(PRIORS), prompts=2, max_new_tokens=16), kit)
    rows = result["candidates"]
    assert {(r["window"], r["ngram"], r["guesses"]) for r in rows} == set(PRIORS)
    for r in rows:
        assert sum(r["processed_counts"].values()) == r["steps"]
        assert candidate_speedup(r, MIDDLE) == pytest.approx(r["predicted_speedup_here"], abs=1e-3)


def test_a_fitted_lookahead_shape_that_accepts_less_than_its_tuner_promised_takes_plain_steps(machine, tmp_path):
    """The guard on Lookahead's fitted shape. A shape whose tuner promised 5 tokens a step, on a
    machine where its pass costs 4 plain steps, is predicted at 1.25x; on a tiny random model
    it can accept 3 at most (N = 3), so it falls back to plain steps (probing now and then) with
    vanilla's tokens. The same shape promising 2.5 on a cheap pass, on a model that repeats its
    last token after a prompt of that token (every n-gram the window makes comes true), drafts
    every step."""
    from methods.lookahead import LookaheadDecoder
    from tests.conftest import repeating_model

    def table(promised: float) -> str:
        path = tmp_path / f"shapes-{promised}.json"
        path.write_text(json.dumps({"window": 2, "ngram": 3, "guesses": 2, "candidates": [
            {"window": 2, "ngram": 3, "guesses": 2, "tokens": int(promised * 100), "steps": 100,
             "mean_accepted_length": promised, "processed_per_step": 8.0, "processed_counts": {"8": 100}}]}))
        return str(path)

    dear = CostCurve((1, 9), (1.0, 4.0))
    machine(dear)
    engine = Engine(tiny_model("llama"))
    decoder = LookaheadDecoder(engine, tuned=table(5.0))
    assert decoder.drafting and decoder.describe()["guard"]["step_cost"] == pytest.approx(4.0, abs=1e-3)
    got = decoder.generate([1, 2, 3], 200)
    assert got.tokens == VanillaDecoder(engine).generate([1, 2, 3], 200).tokens
    record = decoder.describe()["guard"]
    assert record["realized_rate"] < 1 and record["plain_steps"] > 100 and record["probes"] >= 3
    assert sum(1 for n in got.processed if n == 0) > 100

    machine(MIDDLE)
    oracle = LookaheadDecoder(Engine(repeating_model("llama")), tuned=table(2.5))
    got = oracle.generate([3, 3, 3, 3], 200)
    assert oracle.describe()["guard"]["plain_steps"] == 0 and got.mean_accepted_length() > 2.5


def test_a_run_counts_each_guards_plain_and_drafted_steps_over_its_timed_generations(machine, tmp_path,
                                                                                     tiny_model_dir):
    """The manifest's and the report's guard counts are what the guard did while the records were
    timed: each record's own decode steps (every step is drafted or made plain by the guard),
    summed over the records, not the zeros ``describe()`` gives at setup and not the warm-ups."""
    from harness.cli import main
    from harness.report import build_report
    from harness.results import read_records

    shapes = tmp_path / "shapes.json"  # promises 5 tokens a step: a tiny random model accepts far fewer
    shapes.write_text(json.dumps({"window": 2, "ngram": 3, "guesses": 2, "candidates": [
        {"window": 2, "ngram": 3, "guesses": 2, "tokens": 500, "steps": 100, "mean_accepted_length": 5.0,
         "processed_per_step": 8.0, "processed_counts": {"8": 100}}]}))
    machine(CostCurve((1, 9), (1.0, 4.0)))
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_model_dir), "--methods", f"vanilla,lookahead@tuned={shapes}",
                 "--limit", "3", "--max-new-tokens", "48", "--dtype", "float32", "--device", "cpu",
                 "--warmup", "2", "--out", str(out)]) == 0
    every = read_records(out / "results.jsonl")
    label = f"lookahead@tuned={shapes}"
    records = [r for r in every if r["method"] == label]
    assert len(records) == 3 and all("guard" not in r for r in every if r["method"] == "vanilla")
    for r in records:
        steps = sum(len(t["accepted"]) - 1 for t in r["turns"])  # the prefill is no decision of the guard
        assert r["guard"]["drafted_steps"] + r["guard"]["plain_steps"] == steps > 0
    guard = json.loads((out / "manifest.json").read_text())["methods"][label]["guard"]
    for key in ("drafted_steps", "plain_steps", "probes"):
        assert guard[key] == sum(r["guard"][key] for r in records)
    assert guard["plain_steps"] > guard["drafted_steps"] > 0 and guard["step_cost"] == pytest.approx(4.0, abs=1e-3)
    page = build_report(out).read_text()
    steps = guard["drafted_steps"] + guard["plain_steps"]
    assert (f"plain on {guard['plain_steps'] / steps:.0%} of {steps:,} steps; {guard['drafted_steps']:,} drafted "
            f"({guard['probes']:,} of them probes)") in page


def test_a_batch_counts_its_guards_decisions_once_for_all_its_slots(machine, tmp_path):
    """Under load the slots share one guard; a batch's ``LoadRun.guard`` holds the decisions of that
    batch alone (one per slot and step), and the run's totals count each batch once although
    every request of it carries the batch's summary."""
    from harness.metrics import guard_by_method
    from methods.core.batch import Request, serve
    from methods.core.decoder import GenConfig
    from methods.lookahead import LookaheadDecoder

    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"window": 2, "ngram": 3, "guesses": 2, "candidates": [
        {"window": 2, "ngram": 3, "guesses": 2, "tokens": 500, "steps": 100, "mean_accepted_length": 5.0,
         "processed_per_step": 8.0, "processed_counts": {"8": 100}}]}))
    machine(CostCurve((1, 9), (1.0, 4.0)))
    decoder = LookaheadDecoder(Engine(tiny_model("llama")), tuned=str(shapes))
    requests = [Request(p, GenConfig(40)) for p in PROMPTS]
    first = serve(decoder, requests, 2, adapt=False)
    second = serve(decoder, requests[:2], 2, adapt=False, slots_from=first)
    for run in (first, second):
        steps = sum(len(s.generation.accepted) - 1 for s in run.served)
        assert run.guard["drafted_steps"] + run.guard["plain_steps"] == steps > 0
    assert first.guard["plain_steps"] > 0
    both = {k: first.guard[k] + second.guard[k] for k in first.guard}
    assert both == decoder.guard_counts()
    records = [{"method": "la", "concurrency": 2, "load": {"chunk": f"c{i}", "guard": run.guard}}
               for i, run in enumerate((first, second)) for _ in run.served]
    assert guard_by_method(records) == {"la": both}
    assert guard_by_method([{"method": "la", "guard": first.guard}, {"method": "la", "guard": second.guard},
                            {"method": "vanilla"}]) == {"la": both}
