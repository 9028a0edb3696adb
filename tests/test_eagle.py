"""EAGLE-2: lossless dynamic trees on tiny models, the upstream checkpoint layout, and training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from methods.core.engine import Engine
from methods.core.errors import UserError
from methods.eagle import EagleDecoder, EagleHead
from methods.vanilla import VanillaDecoder
from tests.conftest import tiny_model


def random_head(engine: Engine, seed: int = 0, bias: bool = False) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(engine.config, type(engine.layers[0]), bias=bias)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return head


def save_head(head: EagleHead, folder, layout: str = "ours", extra: dict | None = None) -> str:
    """Our layout (model.safetensors) or upstream's (pytorch_model.bin, with a stray embed_tokens key)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in head.state_dict().items()}
    if layout == "upstream":
        state["embed_tokens.weight"] = torch.zeros(3, 3)  # upstream files may carry it; it must be ignored
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "bias": False,
                                                        "num_hidden_layers": 1, **(extra or {})}))
    else:
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(extra or {}))
    return str(folder)


@pytest.mark.parametrize("depth,topk,total", [(1, 1, 1), (3, 2, 6), (5, 4, 16), (4, 3, 30)])
def test_eagle_is_lossless_on_tiny_models(tiny, trained, depth, topk, total):
    """A head trained on the tiny model's own text (tests/drafters.py), so its trees are accepted
    and a wrong verification would show: at least 10% of the steps must take several tokens."""
    from tests.drafters import assert_lossless, held_out_prompts

    engine = Engine(tiny)
    decoder = EagleDecoder(engine, head=trained.eagle(tiny.config.model_type), depth=depth, topk=topk, total=total)
    for got in assert_lossless(decoder, VanillaDecoder(engine), held_out_prompts(3, length=7), 30, min_share=0.1):
        assert max(got.draft_sizes) == min(total, topk + (depth - 1) * topk * topk)


UPSTREAM_DEFAULT = {"upstream_depth": 5, "top_k": 10, "total_token": 60}  # gen_ea_answer_*'s flags


@pytest.mark.parametrize("given,ours", [
    ({"upstream_depth": "5"}, {"depth": 6}),         # upstream drafts depth + 1 levels
    ({"upstream_depth": "0"}, {"depth": 1}),
    ({"top_k": "10"}, {"topk": 10}),
    ({"total_token": "60"}, {"total": 59}),          # upstream's total_token counts the root
    ({"total_token": "-1"}, {"total": "auto"}),      # upstream's automatic setting
    ({"total_token": "auto"}, {"total": "auto"}),
    ({"preset": "upstream"}, {"depth": 6, "topk": 10, "total": 59}),
    ({"preset": "upstream", "top_k": "8"}, {"depth": 6, "topk": 8, "total": 59}),
    ({"depth": "6", "upstream_depth": "5"}, {"depth": 6}),  # both names, the same value
])
def test_upstream_names_convert_to_ours(given, ours):
    from dataclasses import asdict

    from methods.core.options import parse_options
    from methods.eagle import EagleOptions

    got = asdict(parse_options(EagleOptions, given, where="eagle"))
    assert {k: got[k] for k in ours} == ours


def test_a_variant_overrides_the_run_wide_setting_under_either_name():
    from harness.config import parse_method_runs

    def opts(label: str, run_wide: dict) -> tuple:
        o = parse_method_runs([label], {"eagle": run_wide})[0].options
        return o.depth, o.topk, o.total

    assert opts("eagle@top_k=10", {"topk": "4"}) == (5, 10, "auto")
    assert opts("eagle@topk=4", {"top_k": "10"}) == (5, 4, "auto")
    assert opts("eagle@depth=3", {"upstream_depth": "5"}) == (3, 4, "auto")
    assert opts("eagle@preset=upstream", {"depth": "3", "total": "16"}) == (6, 10, 59)
    assert opts("eagle@total_token=17", {"preset": "upstream"}) == (6, 10, 16)
    with pytest.raises(UserError, match="give one of the two names"):
        parse_method_runs(["eagle@topk=4@top_k=10"], {})


def test_recorded_eagle_options_still_load():
    """The CI baseline's eagle options (recorded before upstream's names existed) parse to the same
    options and record back unchanged: aliases and presets add nothing to a record."""
    from dataclasses import asdict
    from pathlib import Path

    from methods.core.options import parse_options
    from methods.eagle import EagleOptions

    for path in sorted((Path(__file__).parent / "baselines").glob("*.json")):
        recorded = json.loads(path.read_text())["method_options"].get("eagle")
        if recorded is not None:
            assert asdict(parse_options(EagleOptions, recorded, where="eagle")) == recorded, path


def test_upstream_preset_drafts_upstreams_tree(tiny, tmp_path):
    """``preset=upstream`` drafts what upstream's total_token=60, depth=5, top_k=10 drafts: 59 tokens
    besides the root, chosen from top_k + depth x top_k^2 candidates over depth + 1 levels."""
    engine = Engine(tiny)
    decoder = EagleDecoder(engine, head=save_head(random_head(engine), tmp_path / "head"), preset="upstream")
    assert decoder.describe()["aliases"] == UPSTREAM_DEFAULT
    o = decoder.options
    assert (o.depth, o.topk, o.total) == (6, 10, 59)
    vanilla = VanillaDecoder(engine)
    prompt = [3, 1, 4, 1, 5, 9]
    got = decoder.generate(prompt, 16)
    assert got.tokens == vanilla.generate(prompt, 16).tokens
    assert max(got.draft_sizes) == 59 and max(got.draft_sizes) == UPSTREAM_DEFAULT["total_token"] - 1


def test_trained_head_is_accepted(tmp_path, monkeypatch):
    """Train the head on the model's own greedy text (the real trainer); its drafts must then be accepted."""
    from harness.train import toolkit
    from methods.core.training import TrainConfig
    from methods.eagle import train as eagle_train
    from tests.test_decode_loop import _sampling_model

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "cache"))
    model = _sampling_model()
    engine = Engine(model)
    vanilla = VanillaDecoder(engine)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(24):
        prompt = torch.randint(0, 12, (6,), generator=g).tolist()
        data.append({"ids": prompt + vanilla.generate(prompt, 26).tokens, "prompt_len": 6})
    cfg = TrainConfig(method="eagle", out=str(tmp_path / "head"), epochs=6, batch_sequences=4, lr=3e-3,
                      checkpoint_every=10, val_fraction=0.1)
    meta = eagle_train.train(cfg, model, None, data, "tiny-eagle", toolkit("cpu"))
    losses = meta["train_loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert meta["val_accuracy"]["depth1"]["top1"] > 0.5
    decoder = EagleDecoder(Engine(model), head=str(tmp_path / "head"), depth=3, topk=2, total=6)
    prompt = data[0]["ids"][:6]
    got = decoder.generate(prompt, 24)
    assert got.tokens == VanillaDecoder(Engine(model)).generate(prompt, 24).tokens
    assert got.mean_accepted_length() > 1.5, got.accepted


@pytest.mark.parametrize("bias", [False, True])
def test_upstream_checkpoint_layout_loads(tmp_path, bias):
    model = tiny_model("llama")
    engine = Engine(model)
    head = random_head(engine, bias=bias)
    keys = set(head.state_dict())
    assert "fc.weight" in keys and ("fc.bias" in keys) == bias
    assert {k.split(".")[0] for k in keys} == {"fc", "layers"}
    assert not any("input_layernorm" in k for k in keys)  # upstream's layer 0 has none
    ours = EagleDecoder(engine, head=save_head(head, tmp_path / "ours"), depth=3, topk=2, total=5)
    upstream = EagleDecoder(engine, head=save_head(head, tmp_path / "up", "upstream"), depth=3, topk=2, total=5)
    for a, b in zip(ours.head.state_dict().values(), upstream.head.state_dict().values()):
        assert torch.equal(a, b)
    prompt = [5, 6, 7, 8]
    assert ours.generate(prompt, 12).draft_sizes == upstream.generate(prompt, 12).draft_sizes


# An EAGLE-1/2 checkpoint as upstream lays it out, written from upstream's module names, not from our
# state dict (SafeAILab/EAGLE, eagle/model/cnets1.py, snapshot cb7e084: ``Model`` holds ``embed_tokens``,
# ``fc = Linear(2 * hidden, hidden, bias=bias)`` applied to ``cat((inputs_embeds, hidden_states))``, and
# ``layers`` of ``LlamaDecoderLayer``: ``self_attn.{q,k,v,o}_proj`` (q/k/v biased when the config has
# ``qkv_bias``), ``mlp.{gate,up,down}_proj``, ``post_attention_layernorm``, and no ``input_layernorm``
# at index 0). Each entry: the upstream key, its shape from the target's config, and the module it
# must land in on our side.
def upstream_layout(config, fc_bias: bool, qkv_bias: bool, embed: bool) -> list[tuple[str, tuple[int, ...], object]]:
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attn = lambda m, name: getattr(m.layers[0].self_attn, name)  # noqa: E731
    mlp = lambda m, name: getattr(m.layers[0].mlp, name)  # noqa: E731
    rows = [("fc.weight", (h, 2 * h), lambda m: m.fc.weight),
            ("layers.0.self_attn.q_proj.weight", (q, h), lambda m: attn(m, "q_proj").weight),
            ("layers.0.self_attn.k_proj.weight", (kv, h), lambda m: attn(m, "k_proj").weight),
            ("layers.0.self_attn.v_proj.weight", (kv, h), lambda m: attn(m, "v_proj").weight),
            ("layers.0.self_attn.o_proj.weight", (h, q), lambda m: attn(m, "o_proj").weight),
            ("layers.0.mlp.gate_proj.weight", (inter, h), lambda m: mlp(m, "gate_proj").weight),
            ("layers.0.mlp.up_proj.weight", (inter, h), lambda m: mlp(m, "up_proj").weight),
            ("layers.0.mlp.down_proj.weight", (h, inter), lambda m: mlp(m, "down_proj").weight),
            ("layers.0.post_attention_layernorm.weight", (h,), lambda m: m.layers[0].post_attention_layernorm.weight)]
    if fc_bias:
        rows.append(("fc.bias", (h,), lambda m: m.fc.bias))
    if qkv_bias:
        rows += [("layers.0.self_attn.q_proj.bias", (q,), lambda m: attn(m, "q_proj").bias),
                 ("layers.0.self_attn.k_proj.bias", (kv,), lambda m: attn(m, "k_proj").bias),
                 ("layers.0.self_attn.v_proj.bias", (kv,), lambda m: attn(m, "v_proj").bias)]
    if embed:  # upstream's Model owns an embedding, so its saved state dicts may carry it: not ours to use
        rows.append(("embed_tokens.weight", (config.vocab_size, h), None))
    return rows


@pytest.mark.parametrize("kind,fc_bias,embed,file", [
    ("llama", True, False, "pytorch_model.bin"),    # upstream's default: bias=True when config.json says nothing
    ("llama", False, False, "model.safetensors"),   # config.json "bias": false, the safetensors file
    ("qwen2", True, False, "pytorch_model.bin"),    # q/k/v biases (upstream's qkv_bias)
    ("llama", False, True, "pytorch_model.bin"),    # a stray embed_tokens: ignored, the target's own is used
], ids=["fc-bias", "no-fc-bias", "qkv-bias", "embed-tokens"])
def test_upstream_checkpoint_loads_by_upstream_module_names(tmp_path, kind, fc_bias, embed, file):
    model = tiny_model(kind)
    engine = Engine(model)
    layout = upstream_layout(model.config, fc_bias, qkv_bias=kind == "qwen2", embed=embed)
    g = torch.Generator().manual_seed(7)
    planted = {key: torch.randn(shape, generator=g) * 0.05 + i for i, (key, shape, _) in enumerate(layout)}
    folder = tmp_path / "EAGLE-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "bias": fc_bias,
                                                    "num_hidden_layers": 1}))
    if file == "model.safetensors":
        save_file(planted, str(folder / file))
    else:
        torch.save(planted, folder / file)
    decoder = EagleDecoder(engine, head=str(folder), depth=3, topk=2, total=5)
    head = decoder.head
    for key, _, where in layout:  # every tensor in the module upstream's name says, and nowhere else
        if where is not None:
            assert torch.equal(where(head), planted[key]), key
    used = sum(planted[key].numel() for key, _, where in layout if where is not None)
    assert sum(p.numel() for p in head.parameters()) == used  # nothing of ours left unloaded
    assert (head.fc.bias is not None) == fc_bias
    # fc reads (embedding, feature) in upstream's order: the first half of its columns takes the embedding
    e, f = torch.randn(1, model.config.hidden_size, generator=g), torch.zeros(1, model.config.hidden_size)
    w = planted["fc.weight"]
    expected = e @ w[:, : model.config.hidden_size].T + (planted["fc.bias"] if fc_bias else 0)
    assert torch.allclose(head.fuse(e, f), expected, atol=1e-5)
    # the draft embeds tokens with the target's own table, whatever the checkpoint carried
    assert torch.equal(decoder.draft_engine.embed_tokens.weight, model.model.embed_tokens.weight)
    prompt = [5, 6, 7, 8]
    assert decoder.generate(prompt, 8).tokens == VanillaDecoder(engine).generate(prompt, 8).tokens


def test_bad_heads_are_one_line_errors(tmp_path):
    engine = Engine(tiny_model("llama"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no EAGLE head in"):
        EagleDecoder(engine, head=str(tmp_path / "empty"))
    other = Engine(tiny_model("llama"))
    small = EagleHead(other.config, type(other.layers[0]))
    state = {k: v for k, v in small.state_dict().items()}
    state["fc.weight"] = torch.zeros(8, 16)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(UserError, match="cannot load the EAGLE head"):
        EagleDecoder(engine, head=str(tmp_path / "bad"))


def test_unrolled_levels_match_a_causal_pass_fed_the_predictions():
    """Level j for anchor t must be what a plain causal pass gives at row t+j-1 when the features
    of rows t+1..t+j-1 are replaced by levels 1..j-1's predictions: exactly the decoder's tree."""
    from methods.eagle.train import unroll

    model = tiny_model("llama")
    engine = Engine(model)
    head = random_head(engine, seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (14,), generator=g)
    feats = torch.randn(14, model.config.hidden_size, generator=g)
    start = 5
    with torch.no_grad():
        levels = unroll(head, model, ids, feats, start, steps=3)
        assert [p.shape[0] for p in levels] == [13 - start] * 3
        for t in (start, start + 3, 10):
            fed = feats.clone()
            for j in (1, 2, 3):
                plain = unroll(head, model, ids, fed, 0, steps=1)[0]  # causal pass: row r predicts feature r+1
                assert torch.allclose(levels[j - 1][t - start], plain[t + j - 1], atol=1e-5), (t, j)
                if t + j < 13:
                    fed[t + j] = levels[j - 1][t - start]


def test_stopping_rule_keeps_the_best_weights(tmp_path):
    """optimise stops after `patience` validations without improvement and restores the best weights."""
    import random

    from methods.core.training import TrainConfig, optimise

    param = torch.nn.Linear(1, 1, bias=False)
    values = iter([1.0, 0.5, 3.0, 2.0, 2.5, 2.9, 9.0])
    seen = []

    def validate() -> float:
        seen.append(float(param.weight.detach()))
        return next(values)

    cfg = TrainConfig(method="x", epochs=100, batch_sequences=1, eval_every=2, patience=3, lr=0.1)
    log = optimise(cfg, param, [0, 1], lambda i, rng: (param.weight - 5.0).pow(2).sum(), tmp_path, "t", validate)
    assert log.stopped == "plateau" and log.best_step == 4
    assert [c["step"] for c in log.curve] == [0, 2, 4, 6, 8, 10]
    assert float(param.weight.detach()) == pytest.approx(seen[2])
    assert len(log.losses) == 10

    # a start that training never beats (a ridge start) is what comes back
    (tmp_path / "b").mkdir()
    start = float(param.weight.detach())
    values = iter([5.0, 1.0, 1.0, 1.0])
    log = optimise(cfg, param, [0, 1], lambda i, rng: (param.weight - 50.0).pow(2).sum(), tmp_path / "b", "t",
                   lambda: next(values))
    assert log.best_step == 0 and log.stopped == "plateau"
    assert float(param.weight.detach()) == pytest.approx(start)


def test_plateau_schedule_cuts_the_rate_at_each_stall_and_resumes(tmp_path):
    """schedule=plateau holds the learning rate, multiplies it by lr_factor when `patience`
    validations pass without improvement (counting afresh after a cut), and stops only at a stall
    after max_lr_cuts cuts; the rate and the cuts survive a resume from the checkpoint."""
    import random

    from methods.core.training import TrainConfig, optimise

    param = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(param.weight)
    # steps 0, 2, ...: best at 2, stall to 8 (cut), stall to 14 (cut), best at 16, stall to 22 (stop)
    values = iter([1.0, 2.0, 1.5, 1.5, 1.5, 1.9, 1.9, 1.9, 3.0, 1.0, 1.0, 1.0])
    weights = []

    def loss(i: int, rng: random.Random) -> torch.Tensor:
        weights.append(float(param.weight.detach()))
        return (param.weight - 50.0).pow(2).sum()

    cfg = TrainConfig(method="x", epochs=100, batch_sequences=1, eval_every=2, patience=3, lr=0.1,
                      warmup_steps=0, schedule="plateau", max_steps=12)
    first = optimise(cfg, param, [0, 1], loss, tmp_path, "t", lambda: next(values))
    assert first.stopped == "budget" and first.lr_cuts == [8]
    cfg.max_steps = None  # the same folder: resumes at step 12 with the cut rate
    log = optimise(cfg, param, [0, 1], loss, tmp_path, "t", lambda: next(values))
    assert log.stopped == "plateau" and log.best_step == 16 and log.lr_cuts == [8, 14]
    assert [c["step"] for c in log.curve] == list(range(0, 24, 2))
    assert [c["lr"] for c in log.curve if c["step"] in (8, 10, 16)] == [0.1, 0.03, 0.009]
    # Adam moves a steadily pulled weight by about the rate each step: the cut rates were applied
    moves = [b - a for a, b in zip(weights, weights[1:])]
    assert moves[3] == pytest.approx(0.1, rel=0.1)     # step 4 -> 5
    assert moves[12] == pytest.approx(0.03, rel=0.1)   # step 12, the first after the resume
    assert moves[18] == pytest.approx(0.009, rel=0.1)  # step 19 -> 20
