"""Trees chosen from measured verify cost: the prediction, the pick, the cache, the fallbacks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from methods.core.cost import CostCurve, cost_curve, layered_cost, pick_tree
from methods.core.engine import Engine
from methods.core.static_tree import StaticTreeDecoder
from tests.conftest import tiny_model

class Probed(StaticTreeDecoder):
    """A static-tree method with a drafter of depth 3 and no weights: what ``auto`` asks of one."""

    def setup(self) -> None:
        self.draft_depth = 3

    def draft_probe(self) -> None:
        pass


def resolve(value: str, config: dict, engine: Engine, model: str) -> tuple:
    return Probed(engine, SimpleNamespace(tree=value), model_name=model).resolve_tree(value, config)


TABLE = [  # teacher-forced accepted lengths of the best tree of each size, as trainers write them
    {"size": 1, "expected_accepted_length": 1.40, "paths": [[0]]},
    {"size": 4, "expected_accepted_length": 1.77, "paths": [[0], [1], [0, 0], [2]]},
    {"size": 12, "expected_accepted_length": 2.06, "paths": [[i] for i in range(6)] + [[0, i] for i in range(6)]},
]


def test_interpolation_between_and_beyond_measured_sizes():
    curve = CostCurve((1, 2, 4), (1.0, 1.2, 2.0))
    assert curve(1) == 1.0 and curve(3) == pytest.approx(1.6) and curve(6) == pytest.approx(2.8)


def test_a_dip_in_the_measured_curve_is_pooled_away():
    """A pass over more tokens never costs less: a noisy dip (32 under 24, as one cached bf16
    curve here had) would price the largest tree before it as cheap."""
    from methods.core.cost import monotone

    assert monotone([1.0, 1.3, 1.1, 1.5]) == pytest.approx([1.0, 1.2, 1.2, 1.5])
    assert monotone([3.0, 2.0, 1.0]) == pytest.approx([2.0, 2.0, 2.0])
    curve = CostCurve((1, 2, 24, 32, 48), (1.0, 0.98, 1.67, 1.58, 2.23))
    assert curve(2) == 1.0  # never under the one-token pass
    assert curve(24) == curve(32) == pytest.approx((1.67 + 1.58) / 2)
    assert curve.as_dict()["ratios"][3] == 1.58  # the raw medians stay on record


def test_a_curve_measured_beside_other_work_is_not_cached(tmp_path, monkeypatch, capsys):
    import methods.core.cost as cost

    engine = Engine(tiny_model("llama"))
    busy = CostCurve((1, 2), (1.0, 1.5), 5.0, load=0.6)
    monkeypatch.setattr(cost, "measure", lambda *a, **k: busy)
    cost._MEMO.clear()
    assert cost_curve(engine, "tiny-busy", tmp_path)(2) == 1.5
    assert not list((tmp_path / "cost").glob("*.json")) and "not caching" in capsys.readouterr().err
    cost._MEMO.clear()
    monkeypatch.setattr(cost, "measure", lambda *a, **k: CostCurve((1, 2), (1.0, 1.2), 5.0, load=0.01))
    assert cost_curve(engine, "tiny-busy", tmp_path)(2) == 1.2
    assert len(list((tmp_path / "cost").glob("*.json"))) == 1
    cost._MEMO.clear()


def test_a_torn_or_misshapen_kept_curve_is_measured_again(tmp_path, monkeypatch):
    import methods.core.cost as cost

    engine = Engine(tiny_model("llama"))
    monkeypatch.setattr(cost, "measure", lambda *a, **k: CostCurve((1, 2), (1.0, 1.3), 5.0, load=0.0))
    path = cost.measurement_path(tmp_path, "cost", cost.hardware_key(engine, "tiny-torn"))
    path.parent.mkdir(parents=True)
    for kept in ('{"sizes": [1, 2], "rat', "[1, 2]", '{"sizes": [1, 2]}'):  # torn; a list; a key missing
        path.write_text(kept)
        cost._MEMO.clear()
        assert cost_curve(engine, "tiny-torn", tmp_path)(2) == 1.3
        assert json.loads(path.read_text())["ratios"] == [1.0, 1.3]  # replaced by the fresh measurement
    cost._MEMO.clear()


def test_other_load_sees_a_busy_neighbour_but_not_this_process():
    import os
    import subprocess
    import time

    from methods.core.cost import LOADED_SHARE, OtherLoad

    if not Path("/proc/stat").is_file():
        pytest.skip("needs /proc/stat")
    with OtherLoad() as idle:
        time.sleep(0.3)
    if idle.share is None or idle.share > 0.1:
        pytest.skip("other work is running on this machine")
    with OtherLoad() as alone:
        end = time.perf_counter() + 0.4
        while time.perf_counter() < end:  # this process busy: not "other" load
            pass
    spinner = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        with OtherLoad() as shared:
            time.sleep(0.6)
    finally:
        spinner.kill()
    cores = os.cpu_count() or 1
    assert alone.share is not None and alone.share < LOADED_SHARE  # its own busy threads never count
    assert shared.share > alone.share + 0.5 / cores  # one spinning core of them all


def test_flat_cost_picks_the_big_tree_and_steep_cost_the_small_one():
    flat = pick_tree(TABLE, CostCurve((1, 64), (1.0, 1.05)), lambda paths: 1 + len(paths))
    assert flat["draft_size"] == 12
    steep = pick_tree(TABLE, CostCurve((1, 2, 64), (1.0, 1.9, 60.0)), lambda paths: 1 + len(paths))
    assert steep["draft_size"] == 1
    assert steep["predicted_speedup"] == pytest.approx(1.40 / 1.9, abs=1e-3)
    assert [c["draft_size"] for c in steep["candidates"]] == [1, 4, 12]


def test_processed_tokens_enter_the_cost():
    """FIRP's pseudo tokens make a tree dearer: with them counted the pick shrinks."""
    curve = CostCurve((1, 13, 64), (1.0, 1.2, 6.0))
    plain = pick_tree(TABLE, curve, lambda paths: 1 + len(paths))
    pseudo = pick_tree(TABLE, curve, lambda paths: (1 + len(paths)) * 3)
    assert plain["draft_size"] == 12 and pseudo["draft_size"] < 12


def test_tokens_entering_at_an_inner_layer_pay_only_for_the_layers_they_run():
    curve = CostCurve((1, 4, 16), (1.0, 1.3, 2.5))
    assert layered_cost(curve, 30, 4, []) == pytest.approx(1.3)
    assert layered_cost(curve, 30, 4, [(0, 12)]) == pytest.approx(2.5)  # from the first layer: the whole pass
    # 12 pseudo tokens joining at layer 18 of 30: 18 layers at t(4), 12 at t(16)
    assert layered_cost(curve, 30, 4, [(18, 12)]) == pytest.approx(0.6 * 1.3 + 0.4 * 2.5)
    # two steps joining at 10 and 20: three stretches
    assert layered_cost(curve, 30, 4, [(10, 6), (20, 6)]) == pytest.approx((1.3 + curve(10) + 2.5) / 3)


def test_firp_prices_its_pseudo_tokens_by_the_layers_they_run():
    """A late prediction layer makes FIRP's pseudo tokens cheap, so the pick can grow."""
    from methods.core.tree import parse_tree
    from methods.firp import FirpDecoder

    curve = CostCurve((1, 5, 13, 64), (1.0, 1.05, 1.3, 6.0))
    table = [{**t, "paths": [p[:2] for p in t["paths"]]} for t in TABLE]

    def firp(layer: int) -> FirpDecoder:  # the pricing needs only the options, the layer count and the maps
        decoder = FirpDecoder.__new__(FirpDecoder)
        decoder.options = SimpleNamespace(chains="all")
        decoder.engine = SimpleNamespace(num_layers=30)
        decoder.maps = SimpleNamespace(layers=[layer] * 3)
        return decoder

    def pick(layer: int) -> dict:
        d = firp(layer)
        return pick_tree(table, curve, lambda paths: d.processed(parse_tree(paths)),
                         pass_cost=lambda paths, c: d.pass_cost(parse_tree(paths), c))

    early, late = pick(0), pick(27)
    assert early["draft_size"] < late["draft_size"]
    tree = parse_tree([[0], [1], [0, 0], [2]])
    assert firp(0).pass_cost(tree, curve) == pytest.approx(curve(firp(0).processed(tree)))  # from layer 0: the plain count


def test_draft_overhead_tilts_the_pick_to_bigger_trees():
    """A per-step drafting cost paid whatever the tree (Medusa's heads) dilutes the pass's
    growth with size, so the pick moves up; without it the middle tree wins."""
    curve = CostCurve((1, 5, 13), (1.0, 1.3, 1.8))
    plain = pick_tree(TABLE, curve, lambda paths: 1 + len(paths))
    assert plain["draft_size"] == 4 and plain["draft_overhead"] == 0
    dear = pick_tree(TABLE, curve, lambda paths: 1 + len(paths), draft_overhead=5.0)
    assert dear["draft_size"] == 12
    assert dear["predicted_speedup"] == pytest.approx(2.06 / 6.8, abs=1e-3)


def test_near_ties_go_to_the_shallowest_tree():
    """Within the prediction's noise (TIE_TOLERANCE) the shallower tree wins; beyond it the faster one."""
    from methods.core.cost import TIE_TOLERANCE

    curve = CostCurve((1, 64), (1.0, 1.0))  # flat: the prediction is the accepted length
    table = [{"size": 3, "expected_accepted_length": 2.0, "paths": [[0], [1], [0, 0]]},
             {"size": 3, "expected_accepted_length": 2.0 * (1 + TIE_TOLERANCE / 2), "paths": [[0], [0, 0], [0, 0, 0]]},
             {"size": 1, "expected_accepted_length": 1.5, "paths": [[0]]}]
    near = pick_tree(table, curve, lambda paths: 1 + len(paths))
    assert near["paths"] == [[0], [1], [0, 0]]
    assert near["best_predicted_speedup"] == pytest.approx(2.0 * (1 + TIE_TOLERANCE / 2))
    table[1]["expected_accepted_length"] = 2.0 * (1 + 2 * TIE_TOLERANCE)
    assert pick_tree(table, curve, lambda paths: 1 + len(paths))["paths"] == [[0], [0, 0], [0, 0, 0]]


def test_auto_adds_the_timed_draft_probe(tmp_path, monkeypatch):
    import methods.core.cost as cost

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path))
    engine = Engine(tiny_model("llama"))
    method = Probed(engine, SimpleNamespace(tree="auto"), model_name="tiny-probe")
    monkeypatch.setattr(cost, "relative_call_cost",
                        lambda eng, fn, name: 0.5 if fn == method.draft_probe else pytest.fail("no probe"))
    _, choice = method.resolve_tree("auto", {"tree_search": TABLE})
    curve = CostCurve(tuple(choice["cost_curve"]["sizes"]), tuple(choice["cost_curve"]["ratios"]))
    assert choice["draft_overhead"] == 0.5
    assert [c["cost"] for c in choice["candidates"]] == pytest.approx([curve(1 + t["size"]) + 0.5 for t in TABLE],
                                                                      abs=2e-4)


def test_auto_measures_once_caches_and_falls_back(tmp_path, monkeypatch):
    import methods.core.cost as cost

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "LOADED_SHARE", 2.0)  # cached even if other work shares the machine now
    engine = Engine(tiny_model("llama"))
    spec, choice = resolve("auto", {"tree_search": TABLE, "default_tree": "2x1"}, engine, "tiny-cost")
    assert choice is not None and spec == choice["paths"]
    saved = list((tmp_path / "cost").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["ratios"][0] == 1.0
    # the cached curve is reused, not re-measured
    import methods.core.cost as cost

    cost._MEMO.clear()
    monkeypatch.setattr(cost, "measure", lambda *a, **k: pytest.fail("re-measured"))
    assert cost_curve(engine, "tiny-cost", tmp_path).as_dict()["ratios"] == choice["cost_curve"]["ratios"]
    # trained / explicit trees and configs without a table skip the measurement
    assert resolve("trained", {"tree_search": TABLE, "default_tree": "2x1"}, engine, "t") == ("2x1", None)
    assert resolve("auto", {"default_tree": "2x1"}, engine, "t") == ("2x1", None)
    assert resolve("trained", {}, engine, "t") == (Probed.default_tree, None)
    assert resolve("4x1", {}, engine, "t") == ("4x1", None)
    # trees deeper than the heads are never candidates
    deep = [*TABLE, {"size": 3, "expected_accepted_length": 9.0, "paths": [[0], [0, 0], [0, 0, 0, 0]]}]
    _, choice = resolve("auto", {"tree_search": deep}, engine, "tiny-cost")
    assert all(c["expected_accepted_length"] < 9 for c in choice["candidates"])


def test_medusa_auto_tree_is_recorded_and_lossless(tmp_path, monkeypatch):
    from methods.medusa import MedusaDecoder, MedusaHeads
    from methods.vanilla import VanillaDecoder
    from safetensors.torch import save_file

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    engine = Engine(model)
    torch.manual_seed(0)
    heads = MedusaHeads(model.config.hidden_size, model.config.vocab_size, 2, "shared")
    folder = tmp_path / "heads"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in heads.upstream_state_dict().items()}, str(folder / "heads.safetensors"))
    table = [{**t, "paths": [p[:2] for p in t["paths"]]} for t in TABLE]
    (folder / "config.json").write_text(json.dumps({"default_tree": "2x1", "tree_search": table}))
    decoder = MedusaDecoder(engine, heads=str(folder))
    info = decoder.describe()
    assert info["tree_choice"]["predicted_speedup"] > 0 and sorted(info["tree_paths"]) == sorted(info["tree_choice"]["paths"])
    assert decoder.generate([1, 2, 3], 16).tokens == VanillaDecoder(engine).generate([1, 2, 3], 16).tokens


def _medusa_auto(model, tmp_path, monkeypatch, expected: float):
    """A Medusa decoder on ``model`` with zero-initialised heads (they copy the base model's guess)
    and an ``auto`` tree whose trainer promised ``expected`` tokens a step, on a fixed cost curve."""
    import methods.core.cost as cost
    from methods.medusa import MedusaDecoder, MedusaHeads
    from safetensors.torch import save_file

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cost, "cost_curve", lambda *a, **k: CostCurve((1, 64), (1.0, 1.5)))
    monkeypatch.setattr(cost, "relative_call_cost", lambda *a, **k: 0.5)
    heads = MedusaHeads(model.config.hidden_size, model.config.vocab_size, 2, "shared")
    folder = tmp_path / "heads"
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in heads.upstream_state_dict().items()}, str(folder / "heads.safetensors"))
    table = [{"size": 2, "expected_accepted_length": expected, "paths": [[0], [0, 0]]}]
    (folder / "config.json").write_text(json.dumps({"default_tree": "1x1", "tree_search": table}))
    return MedusaDecoder(engine := Engine(model), heads=str(folder)), engine


def test_a_fitted_tree_that_accepts_less_than_promised_takes_plain_steps(tmp_path, monkeypatch):
    """The guard: heads whose trainer promised 2.5 tokens a step but whose drafts a random model
    rejects fall back to plain steps (probing now and then), with vanilla's tokens; the same
    heads on a model whose next token they always guess keep drafting every step."""
    from methods.vanilla import VanillaDecoder
    from tests.conftest import repeating_model

    decoder, engine = _medusa_auto(tiny_model("llama"), tmp_path, monkeypatch, expected=2.5)
    assert decoder.drafting and decoder.describe()["guard"]["step_cost"] == pytest.approx(
        CostCurve((1, 64), (1.0, 1.5))(3) + 0.5, abs=1e-3)  # the 2-node tree's pass and the heads
    got = decoder.generate([1, 2, 3], 200)
    assert got.tokens == VanillaDecoder(engine).generate([1, 2, 3], 200).tokens
    record = decoder.describe()["guard"]
    assert record["realized_rate"] < 1 and record["plain_steps"] > 100 and record["probes"] >= 3
    assert sum(1 for n in got.draft_sizes if n == 0) > 100

    oracle, _ = _medusa_auto(repeating_model("llama"), tmp_path, monkeypatch, expected=2.5)
    got = oracle.generate([1, 2, 3], 200)
    assert oracle.describe()["guard"]["plain_steps"] == 0 and got.mean_accepted_length() > 2.5
