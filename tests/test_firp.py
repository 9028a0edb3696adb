"""FIRP: inference chains equal the training forward, pseudo tokens never persist, and
decoding is lossless for every option combination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from methods.firp.train import parse_layers, pseudo_forward
from methods.core.engine import Engine
from methods.firp import FirpDecoder, FirpMaps, build_plan, injections
from methods.vanilla import VanillaDecoder
from tests.conftest import tiny_model


def _random_maps(model, layers, mode="serialized", input="prev", seed=0, scale=0.3) -> FirpMaps:
    maps = FirpMaps(model.config.hidden_size, layers, mode, input)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in maps.maps:
            m.weight.add_(torch.randn(m.weight.shape, generator=g) * scale)
    return maps


@pytest.mark.parametrize("layers,mode,input", [
    ([1, 1, 1], "serialized", "prev"),
    ([1, 1, 1], "parallel", "prev"),
    ([1, 2, 2], "serialized", "prev+anchor"),
    ([2, 2], "parallel", "prev+anchor"),
])
def test_engine_chains_equal_training_forward(layers, mode, input):
    model = tiny_model("llama")
    maps = _random_maps(model, layers, mode, input)
    prompt = [5, 9, 14, 3, 77, 21, 8]
    n = len(prompt)
    engine = Engine(model)
    engine.reset()
    plan = build_plan(maps, torch.ones((1, n), dtype=torch.bool), [n - 1])
    out = engine.forward(prompt, injections=injections(maps, plan, torch.tensor([n - 1]), engine.device), commit=True)
    assert engine.cache.length == n  # pseudo tokens are never committed
    got = out.hidden[n:].view(maps.K, 1, -1)

    with torch.no_grad():
        hs = model.model(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        ref, _ = pseudo_forward(model, maps, hs[layers[0]][0], torch.tensor([n - 1]))
    assert (got - ref).abs().max() < 1e-4
    # several anchors at once (training) equal one anchor at a time (inference)
    with torch.no_grad():
        multi, _ = pseudo_forward(model, maps, hs[layers[0]][0], torch.tensor([2, 4, n - 1]))
    assert (multi[:, 2:3] - ref).abs().max() < 1e-4


def test_training_forward_gradients_match_finite_differences():
    """The training pass runs the real tokens without gradients and the pseudo tokens alone after
    them: the maps' gradients must still be right (central differences in float64; the model's
    RMSNorm computes in float32, hence the step and the tolerance)."""
    model = tiny_model("llama").double()
    maps = _random_maps(model, [1, 2, 2], "serialized", "prev+anchor").double()
    h = model.model(torch.tensor([[5, 9, 14, 3, 77, 21, 8, 40]]), output_hidden_states=True).hidden_states[1][0].detach()
    anchors = torch.tensor([1, 3, 4])
    target = torch.randn(3, 3, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss() -> torch.Tensor:
        return (pseudo_forward(model, maps, h, anchors)[0] * target).sum()

    maps.zero_grad()
    loss().backward()
    for k, (r, c) in ((0, (3, 5)), (1, (7, 70)), (2, (0, 1))):  # W_1 and W_2 enter at layer 2, after W_0's layer
        w = maps.maps[k].weight
        with torch.no_grad():
            w[r, c] += 1e-3
            up = loss()
            w[r, c] -= 2e-3
            down = loss()
            w[r, c] += 1e-3
        grad = float(w.grad[r, c])
        assert abs(grad) > 1e-3 and abs(grad - float(up - down) / 2e-3) < 0.03 * abs(grad) + 1e-3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in maps.parameters())


def _decoder(engine, maps, tmp_path, tree, chains="all"):
    folder = tmp_path / "firp"
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in maps.state_dict().items()}, str(folder / "firp.safetensors"))
    (folder / "config.json").write_text(json.dumps({**maps.config(), "default_tree": tree}))
    return FirpDecoder(engine, weights=str(folder), chains=chains)


CASES = [
    ([1, 1, 1], "serialized", "prev", "3x2x1", "all"),
    ([1, 1, 1], "parallel", "prev", "2x2x2", "all"),
    ([1, 2, 2], "serialized", "prev+anchor", "[[0], [1], [0, 0], [0, 0, 0]]", "all"),
    ([2, 2, 2], "serialized", "prev", "3x2x1", "spine"),
    ([1, 1], "serialized", "prev", "1x1", "spine"),
    ([1, 2, 2], "serialized", "prev", "2x2", "all"),  # tree shallower than K: chains truncated
]


@pytest.mark.parametrize("layers,mode,input,tree,chains", CASES)
def test_firp_is_lossless_on_tiny_models(tiny, trained, tmp_path, layers, mode, input, tree, chains):
    """Maps trained on the tiny model's own text (tests/drafters.py), so chains are accepted and
    a wrong verification would show: at least 10% of the steps must take several tokens."""
    from safetensors.torch import load_file

    from tests.drafters import assert_lossless, held_out_prompts

    engine = Engine(tiny)
    maps = FirpMaps(tiny.config.hidden_size, layers, mode, input)
    maps.load_state_dict(load_file(f"{trained.firp(tiny.config.model_type, layers, mode, input)}/firp.safetensors"))
    decoder = _decoder(engine, maps, tmp_path, tree, chains)
    assert_lossless(decoder, VanillaDecoder(engine), held_out_prompts(3), 30, min_share=0.1)


def test_identity_maps_on_repetitive_model_accept_drafts(tmp_path):
    """On a model that repeats its last token, identity maps predict the future exactly (a pseudo
    state is a copy of its anchor's): every step accepts its whole 3-deep chain, losslessly."""
    from tests.conftest import repeating_model

    model = repeating_model("qwen2")
    engine = Engine(model)
    maps = FirpMaps(model.config.hidden_size, [1, 1, 1])
    decoder = _decoder(engine, maps, tmp_path, "2x1x1")
    got = decoder.generate([1, 2, 3, 4], 25)
    assert got.tokens == VanillaDecoder(engine).generate([1, 2, 3, 4], 25).tokens
    assert len(got.draft_sizes) == len(got.accepted) and got.draft_sizes[0] == 0
    assert got.mean_accepted_length() > 3.0 and all(a == 4 for a in got.accepted[1:-1])


def test_parse_layers():
    assert parse_layers("10", 3, 30) == [10, 10, 10]
    assert parse_layers("10,15,20", 3, 30) == [10, 15, 20]
    with pytest.raises(ValueError):
        parse_layers("10,15", 3, 30)


def test_analysis_reports_cosine_by_layer_and_accuracy(tmp_path):
    from methods.firp.analysis import analyze_maps

    model = tiny_model("llama")
    maps = _random_maps(model, [1, 1])
    g = torch.Generator().manual_seed(1)
    data = [{"ids": torch.randint(0, 97, (20,), generator=g).tolist(), "prompt_len": 6} for _ in range(3)]
    result = analyze_maps(model, maps, data, anchors_per_seq=5)
    assert result["positions"] == 15
    cos = result["cosine_by_layer"]["step1"]
    assert list(cos) == ["1", "2", "final"] and all(-1.0 <= v <= 1.0 for v in cos.values())
    assert 0.0 <= result["accuracy"]["step2"]["top1"] <= result["accuracy"]["step2"]["top3"] <= 1.0
    from methods.firp.report import section

    (tmp_path / "firp_analysis.json").write_text(json.dumps({"sequences": 3, "maps": {"weights": "w", **result}}))
    html = section(tmp_path)["html"]
    chart = html[html.index('id="firp-cosine-chart"'):]
    assert "<svg" in chart[:400] and "entering layer" in chart and "step2" in chart


def test_layer_sweep_trains_and_measures_every_layer(tmp_path, monkeypatch):
    """Each swept layer gets maps trained at that layer, a validation accepted length and a measured step
    cost; the FIRP report section shows the table."""
    from harness.train import toolkit
    from methods.core.training import TrainConfig
    from methods.firp.analysis import sweep_layers
    from methods.firp.report import section

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    data = [{"ids": torch.randint(0, 97, (24,), generator=g).tolist(), "prompt_len": 8} for _ in range(12)]
    base = TrainConfig(method="firp", max_steps=2, epochs=1, eval_every=10**9, val_fraction=0.25,
                       options={"K": 2, "input": "anchor", "tree_size": 2, "anchors_per_seq": 4})
    rows = sweep_layers(model, None, data, base, [1, 2], toolkit("cpu"), tmp_path / "sweep", torch.float32,
                        prompts=2, new_tokens=6)
    assert [r["layer"] for r in rows] == [1, 2]
    for r in rows:
        saved = json.loads((tmp_path / "sweep" / f"layer{r['layer']}" / "config.json").read_text())
        assert saved["layers"] == [r["layer"]] * 2 and saved["train_steps"] == 2
        assert r["step_cost"] > 0 and r["predicted_speedup"] == pytest.approx(r["val_accepted_length"] / r["step_cost"],
                                                                               rel=1e-2)
        assert 1.0 <= r["val_accepted_length"] <= 3.0
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "firp_analysis.json").write_text(json.dumps(
        {"sequences": 2, "layer_sweep": {"steps_each": 2, "input": "anchor", "rows": rows}}))
    html = section(tmp_path / "run")["html"]
    assert 'id="layer-sweep"' in html and html.count("<tr><td>") == 2
    chart = html[html.index('id="firp-sweep-chart"'):]
    assert "<svg" in chart[:400] and "prediction layer" in chart  # the sweep as a chart, beside the table
    assert 'id="firp-cosine-chart"' not in html  # no maps analysed here: no cosine chart to draw


class _CharTokenizer:
    """One id per printable ASCII character, no chat template: distinct prompts get distinct ids."""

    chat_template = None
    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [1 if c == "\n" else ord(c) - 30 for c in text]}


def _training_files(root) -> list[str]:
    """A GSM8K-like file (one question twice) and a BoolQ-like one (several questions per passage)."""
    gsm = root / "gsm8k" / "train.jsonl"
    boolq = root / "boolq" / "dev.jsonl"
    gsm.parent.mkdir()
    boolq.parent.mkdir()
    questions = [f"What is {i} plus {i + 3}?" for i in range(14)] + ["What is 2 plus 5?"]  # seed 0: one copy in the first 12
    gsm.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in questions))
    rows = [{"passage": f"Passage {p}: the {p} fox runs.", "question": f"does the {p} fox run {q}", "answer": True,
             "title": p} for p in ("red", "blue", "green", "grey", "pink") for q in ("fast", "far", "home")]
    boolq.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [str(gsm), str(boolq)]


def _passage(prompt: str) -> str | None:
    return prompt.split("\n\nBased on the passage above")[0] if "Based on the passage above" in prompt else None


def test_analysis_holds_out_every_prompt_the_maps_trained_on(tmp_path, monkeypatch):
    """Maps are trained by `harness train firp` on tiny files; `analyze` must then analyse answers to
    prompts training never handed the model, and none sharing a BoolQ passage with one: the prompts
    each phase distils are recorded at generation, and the analysed sequences' prompt ids are
    compared with every training prompt's."""
    import harness.models
    from harness import distill
    from harness.train import toolkit, train
    from methods.core.prompts import encode_conversation
    from methods.core.training import TrainConfig
    from methods.firp import analysis

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("llama"), _CharTokenizer()
    model.generation_config.eos_token_id = 0
    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: (model, tok))
    monkeypatch.setattr(harness.models, "check_model_name", lambda name: None)
    asked: list[list[str]] = []
    generate = distill.generate_continuations
    monkeypatch.setattr(distill, "generate_continuations",
                        lambda m, t, prompts, **kw: asked.append(list(prompts)) or generate(m, t, prompts, **kw))
    analysed: list[dict] = []
    analyze_maps = analysis.analyze_maps
    monkeypatch.setattr(analysis, "analyze_maps", lambda m, maps, data, **kw: analysed.extend(data)
                        or analyze_maps(m, maps, data, **kw))

    files = _training_files(tmp_path)
    train(TrainConfig(method="firp", model="tiny", data=files, out=str(tmp_path / "maps"), dtype="float32", limit=12,
                      max_new_tokens=4, epochs=1, max_steps=1, eval_every=10**9, val_fraction=0.25,
                      options={"layers": 1, "K": 2, "tree_size": 2, "anchors_per_seq": 4}))
    (trained,) = asked
    assert len(trained) == 12
    asked.clear()
    result = analysis.analyze({"model": "tiny", "weights": str(tmp_path / "maps"), "data": files, "sequences": 8,
                               "out": str(tmp_path / "firp_analysis.json")}, toolkit("cpu"))

    (held,) = asked
    assert len(held) == 8 and result["sequences"] == 8 and len(analysed) == 8
    assert not set(held) & set(trained)
    training_ids = {tuple(encode_conversation(tok, [{"role": "user", "content": p}])) for p in trained}
    assert not {tuple(d["ids"][:d["prompt_len"]]) for d in analysed} & training_ids
    training_passages = {_passage(p) for p in trained} - {None}
    assert not {_passage(p) for p in held} & training_passages
    record = result["held_out"]
    # 30 prompts: the 12 trained on, the repeated question's later copy and the rows sharing a passage are left out
    assert record["left_out_as_training_prompts"] == 13 and record["left_out_sharing_a_training_passage"] > 0
    assert record["candidates"] == 30 - 13 - record["left_out_sharing_a_training_passage"]
    assert len(record["ranks"]) == 8 and min(record["ranks"]) >= 12 and "no training run" in record["source"]
    assert json.loads((tmp_path / "firp_analysis.json").read_text())["held_out"] == record
    from methods.firp.report import section

    assert "no training run of the weights selected" in section(tmp_path)["html"]  # the report says so too


@pytest.mark.parametrize("edit,expected", [
    (lambda meta, files: meta.pop("train_config"), "does not record the data"),
    (lambda meta, files: meta["train_config"].update(data=files[:1] + ["elsewhere/other.jsonl"]),
     "trained on elsewhere/other.jsonl; pass it to --data"),
    (lambda meta, files: meta["train_config"].update(init_from="runs/earlier"), "runs/earlier/config.json does not record"),
    (lambda meta, files: meta["train_config"].update(limit=None), "every prompt of --data was seen in training"),
])
def test_analysis_refuses_weights_whose_training_prompts_it_cannot_tell(tmp_path, edit, expected):
    """Where the weights' config.json cannot say which prompts they saw, or leaves none unseen, the
    analysis refuses in one line before the model loads, instead of analysing training data."""
    from harness.distill import held_out_prompts, load_prompts
    from methods.core.errors import UserError
    from methods.core.training import Toolkit
    from methods.firp.analysis import analyze

    files = _training_files(tmp_path)
    meta = {"layers": [1, 1], "train_config": {"data": list(files), "limit": 12, "seed": 0, "max_new_tokens": 4}}
    edit(meta, files)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "config.json").write_text(json.dumps(meta))
    kit = Toolkit(cache_dir=tmp_path, load_model=lambda *a, **k: pytest.fail("the model loaded before the refusal"),
                  training_prompts=load_prompts, training_sequences=None, check_model=lambda name: None,
                  held_out_prompts=held_out_prompts, prompt_sequences=None)
    with pytest.raises(UserError) as err:
        analyze({"model": "tiny", "weights": str(tmp_path / "maps"), "data": files, "out": str(tmp_path / "a.json")}, kit)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_held_out_prompts_leave_out_every_training_stage(tmp_path):
    """Weights continued from an earlier run (``--init-from``) saw that run's prompts too: a start
    with another seed selects other prompts, and both sets stay out of the held-out split."""
    from harness.distill import held_out_prompts, load_prompts
    from methods.core.training import training_stages

    files = _training_files(tmp_path)
    earlier = {"command": "first", "train_config": {"data": files, "limit": 6, "seed": 5, "max_new_tokens": 4}}
    meta = {"train_config": {"data": files, "limit": 6, "seed": 0, "init_from": "runs/earlier", "max_new_tokens": 4},
            "continued_from": earlier}
    stages = training_stages(meta, tmp_path, [Path(f) for f in files])
    assert [(s["limit"], s["seed"]) for s in stages] == [(6, 0), (6, 5)]
    held, record = held_out_prompts([Path(f) for f in files], stages)
    seen = set(load_prompts(files, limit=6, seed=0)) | set(load_prompts(files, limit=6, seed=5))
    assert held and not set(held) & seen and record["training_stages"] == 2


@pytest.mark.parametrize("mode,input", [("serialized", "prev"), ("parallel", "prev+anchor")])
def test_chains_at_inner_tree_nodes_equal_the_same_chains_run_one_by_one(mode, input):
    """The decoder anchors a chain at every tree node in one pass. Each node's chain must equal
    the chain anchored at the end of that node's own branch, run alone after the prefix: a
    wrong pseudo-token mask (a chain seeing a sibling branch, or another chain) shows here,
    though it cannot change the tokens decoding emits."""
    from methods.core.tree import TreeLayout, parse_tree

    model = tiny_model("llama")
    maps = _random_maps(model, [1, 2, 2], mode, input, seed=3)
    engine = Engine(model)
    tree = parse_tree("2x2x1")
    prefix = [5, 9, 14, 3, 77]
    node_tokens = [21] + [(11 * (i + 1)) % 97 for i in range(tree.size - 1)]  # any distinct tokens per node
    layout = TreeLayout.from_tree(tree, engine)
    anchors = list(range(tree.size))
    plan = build_plan(maps, tree.visible[anchors], anchors)
    engine.reset()
    engine.forward(prefix, commit=True)
    past = engine.cache.length
    inj = injections(maps, plan, tree.depths[plan.anchors] + past, engine.device)
    out = engine.forward(node_tokens, position_ids=layout.positions + past, step_bias=layout.bias, injections=inj)
    parents = tree.parents.tolist()
    for node in anchors:
        branch, cur = [], node
        while cur >= 0:
            branch.insert(0, node_tokens[cur])
            cur = parents[cur]
        seq = prefix + branch
        engine.reset()
        alone = build_plan(maps, torch.ones((1, len(seq)), dtype=torch.bool), [len(seq) - 1])
        ref = engine.forward(seq, injections=injections(maps, alone, torch.tensor([len(seq) - 1]), engine.device),
                             commit=True).hidden[len(seq):]
        got = out.hidden[plan.rows_of(node, maps.K)]
        assert (got - ref).abs().max() < 1e-4, f"chain at node {node} differs"
