"""Head training on a tiny random model: files written, accuracy reported, checkpoints resume."""

from __future__ import annotations

import json

import pytest
import torch

from methods.core.training import TrainConfig, lr_at, split_train_val
from tests.conftest import tiny_model


@pytest.fixture
def tiny_data():
    g = torch.Generator().manual_seed(0)
    return [{"ids": torch.randint(0, 97, (30,), generator=g).tolist(), "prompt_len": 10} for _ in range(12)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def toolkit(tmp_path):
    from harness.train import toolkit

    return toolkit("cpu")


def _dropped(losses: list[float]) -> bool:
    """The last third of the steps has a lower mean loss than the first third."""
    third = max(1, len(losses) // 3)
    return sum(losses[-third:]) / third < sum(losses[:third]) / third


def test_lr_schedule_and_split():
    assert lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(10, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_at(100, 100, 1e-3, 10) == pytest.approx(0.0, abs=1e-12)
    train, val = split_train_val(list(range(20)), 0.1, 0)
    assert len(val) == 2 and not set(train) & set(val)


@pytest.mark.parametrize("native", [False, True])
def test_training_precision_follows_the_cpus_bf16_units(monkeypatch, native):
    """Trainers run under bf16 autocast only where the CPU has bf16 arithmetic; elsewhere bf16 is
    emulated (tens of times slower for the LM head's backward) and they train in float32."""
    from methods.core import hardware
    from methods.core.training import autocast

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") is native
        assert (x @ w).dtype == (torch.bfloat16 if native else torch.float32)


def test_feature_cache_takes_float32_products_without_bf16_units(tmp_path, tiny_data, monkeypatch):
    """The feature cache's pass of a bf16 model runs its projections as float32 products of the
    same weights on a CPU without bf16 units (an emulated bf16 GEMM is several times slower),
    gives the native pass's features within bf16 rounding, and leaves the model's modules as
    they were."""
    from methods.core import engine as engine_module
    from methods.core.training import cached_features

    model = tiny_model("llama").to(torch.bfloat16)
    monkeypatch.setattr(engine_module, "_NATIVE", [True])
    native = cached_features(model, tiny_data, [-1, 2], "k", tmp_path / "a")
    calls = []
    real = engine_module.upcast_product

    def spy(x, weight, bias):
        out = real(x, weight, bias)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(engine_module, "upcast_product", spy)
    monkeypatch.setattr(engine_module, "_NATIVE", [False])
    routed = cached_features(model, tiny_data, [-1, 2], "k", tmp_path / "b")
    assert calls and all(calls)
    for a, b in zip(native, routed):
        for layer in (-1, 2):
            assert b[layer].dtype == torch.bfloat16
            assert (a[layer].float() - b[layer].float()).norm() < 0.05 * a[layer].float().norm()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(m) is torch.nn.Linear for m in linears)
    assert not any(id(m.weight) in engine_module._shadows for m in linears)  # the float32 copies are freed


def test_feature_cache_resumes_an_interrupted_pass(tmp_path, tiny_data):
    """An interrupted feature pass keeps the parts it finished: the rerun computes only the rest
    and gives the features of an uninterrupted pass, and the parts are removed once whole."""
    from methods.core.training import cached_features

    model = tiny_model("llama")
    whole = cached_features(model, tiny_data, [-1, 2], "k", tmp_path / "a", batch_size=2, chunk_batches=2)
    calls, fail_at = [], [4]
    real = model.model.forward

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at[0]:  # 12 sequences: 6 batches in 3 parts; fail inside the second part
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    model.model.forward = failing
    with pytest.raises(RuntimeError, match="interrupted"):
        cached_features(model, tiny_data, [-1, 2], "k", tmp_path / "b", batch_size=2, chunk_batches=2)
    assert len(list((tmp_path / "b" / "features").glob("*.part*.pt"))) == 2  # part 0, both layers
    calls.clear()
    fail_at[0] = 0
    resumed = cached_features(model, tiny_data, [-1, 2], "k", tmp_path / "b", batch_size=2, chunk_batches=2)
    assert len(calls) == 4  # parts 1 and 2 only
    for a, b in zip(whole, resumed):
        for layer in (-1, 2):
            assert torch.equal(a[layer], b[layer])
    assert not list((tmp_path / "b" / "features").glob("*.part*"))


@pytest.mark.parametrize("layout", ["shared", "upstream"])
def test_medusa_training_writes_heads_and_resumes(tmp_path, tiny_data, layout, toolkit):
    from methods.medusa import train as medusa
    from methods.core.engine import Engine
    from methods.medusa import MedusaDecoder
    from methods.vanilla import VanillaDecoder

    model = tiny_model("llama")
    out = tmp_path / "heads"
    cfg = TrainConfig(method="medusa", out=str(out), epochs=2, batch_sequences=4, checkpoint_every=1,
                      options={"heads": 2, "layout": layout, "tree": "2x1"})
    meta = medusa.train(cfg, model, None, tiny_data, "tiny", toolkit)
    assert (out / "heads.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["val_accuracy"]["head1"]["positions"] > 0 and saved["layout"] == layout
    from methods.core.hardware import cpu_has_native_bf16, machine, machine_label
    assert saved["precision"] == ("bf16 autocast" if cpu_has_native_bf16() else "float32")
    assert saved["trained_on"] == machine_label(machine("cpu"))
    assert all("per_position_accepted_length" in t for t in saved["tree_search"])
    assert saved["train_steps"] == 6 == len(saved["train_loss"])
    assert _dropped(saved["train_loss"]), saved["train_loss"]
    # a finished checkpoint resumes straight to the end
    again = medusa.train(cfg, model, None, tiny_data, "tiny", toolkit)
    assert again["val_accuracy"] == meta["val_accuracy"]
    engine = Engine(model)
    got = MedusaDecoder(engine, heads=str(out)).generate([1, 2, 3], 20).tokens
    assert got == VanillaDecoder(engine).generate([1, 2, 3], 20).tokens


def test_training_continues_from_earlier_weights(tmp_path, tiny_data, toolkit):
    """``--init-from``, for every trainer: the second run starts from the first run's (perturbed)
    weights: at lr 0 it writes them back unchanged, where a fresh start differs; FIRP skips its
    ridge fit, and weights of other settings are refused."""
    from safetensors.torch import load_file

    from methods.core.errors import UserError
    from methods.firp import train as firp
    from methods.medusa import train as medusa

    def weights(folder: str) -> dict[str, torch.Tensor]:
        return load_file(str(next((tmp_path / folder).glob("*.safetensors"))))

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model = tiny_model("llama")
    from methods.eagle import train as eagle
    from methods.sps import train as sps

    for method, trainer, opts, key in (("medusa", medusa, {"heads": 2}, "tiny"),
                                       ("firp", firp, {"K": 2, "layers": "1", "anchors_per_seq": 8}, "tiny-firp"),
                                       ("sps", sps, {"layers": 1}, "tiny-sps"), ("eagle", eagle, {}, "tiny-eagle")):
        def run(out: str, **kw) -> dict:
            cfg = TrainConfig(method=method, out=str(tmp_path / out), options=opts, **kw)
            return trainer.train(cfg, model, None, tiny_data, key, toolkit)

        run(f"{method}-a", max_steps=2)
        from safetensors.torch import save_file  # move the weights off anything a fresh start could give
        path = next((tmp_path / f"{method}-a").glob("*.safetensors"))
        save_file({k: v + 0.5 * torch.randn_like(v) for k, v in weights(f"{method}-a").items()}, str(path))
        meta = run(f"{method}-b", max_steps=1, lr=0.0, init_from=str(tmp_path / f"{method}-a"))
        assert same(weights(f"{method}-b"), weights(f"{method}-a"))
        earlier = json.loads((tmp_path / f"{method}-b" / "config.json").read_text())["continued_from"]
        assert earlier["folder"] == str(tmp_path / f"{method}-a") and earlier["train_steps"] == 2
        run(f"{method}-fresh", max_steps=1, lr=0.0)
        assert not same(weights(f"{method}-fresh"), weights(f"{method}-a"))
        if method == "firp":
            assert meta["init"] == f"from {tmp_path / 'firp-a'}" and "ridge_r2" not in meta
    with pytest.raises(UserError, match="do not fit"):
        medusa.train(TrainConfig(method="medusa", out=str(tmp_path / "c"), max_steps=1,
                                 init_from=str(tmp_path / "medusa-a"), options={"heads": 3}),
                     model, None, tiny_data, "tiny", toolkit)
    with pytest.raises(UserError, match="do not fit a 2-layer draft|keys do not match a 2-layer draft"):
        sps.train(TrainConfig(method="sps", out=str(tmp_path / "d"), max_steps=1, init_from=str(tmp_path / "sps-a"),
                              options={"layers": 2}), model, None, tiny_data, "tiny-sps", toolkit)


def test_firp_training_writes_maps_and_loss_drops(tmp_path, tiny_data, toolkit):
    from methods.firp import train as firp
    from methods.core.engine import Engine
    from methods.firp import FirpDecoder
    from methods.vanilla import VanillaDecoder

    model = tiny_model("llama")
    out = tmp_path / "firp"
    cfg = TrainConfig(method="firp", out=str(out), epochs=2, batch_sequences=4, checkpoint_every=2, lr=3e-3,
                      options={"K": 2, "layers": "1", "tree": "2x1", "anchors_per_seq": 8})
    meta = firp.train(cfg, model, None, tiny_data, "tiny-firp", toolkit)
    saved = json.loads((out / "config.json").read_text())
    assert saved["layers"] == [1, 1] and saved["mode"] == "serialized"
    assert _dropped(saved["train_loss"]), saved["train_loss"]
    assert set(meta["val_accuracy"]) == {"step1", "step2"}
    # the tree table walks every validation anchor as decoding does, not the 8 sampled per answer
    assert all("per_position_accepted_length" in t for t in saved["tree_search"])
    assert saved["val_accuracy"]["step1"]["positions"] > 8 * saved["val_sequences"]
    engine = Engine(model)
    got = FirpDecoder(engine, weights=str(out)).generate([1, 2, 3], 20).tokens
    assert got == VanillaDecoder(engine).generate([1, 2, 3], 20).tokens


@pytest.mark.parametrize("kind", ["anchor", "prev", "prev+anchor"])
def test_firp_ridge_init_recovers_a_linear_future(kind):
    """Features whose future is an exact linear function of the present: the ridge fit must find it."""
    from methods.firp.decoder import FirpMaps
    from methods.firp.train import ridge_init

    d, g = 6, torch.Generator().manual_seed(0)
    A = torch.linalg.qr(torch.randn(d, d, generator=g)).Q * 0.9  # a stable linear dynamic
    b = torch.randn(d, generator=g) * 0.1
    data, feats = [], []
    for _ in range(8):
        h = [torch.randn(d, generator=g)]
        for _ in range(39):
            h.append(A @ h[-1] + b)
        data.append({"ids": list(range(40)), "prompt_len": 3})
        feats.append({4: torch.stack(h)})
    maps = FirpMaps(d, [4, 4], "serialized", kind)
    fits = ridge_init(maps, data, feats, list(range(8)), ridge=1e-9)
    assert min(fits.values()) > 0.999, fits
    h = feats[0][4]
    t = 10
    step1 = maps.make(0, h[t], h[t])
    assert torch.allclose(step1, h[t + 1], atol=1e-3)
    step2 = maps.make(1, step1 if kind != "anchor" else h[t], h[t])
    assert torch.allclose(step2, h[t + 2], atol=1e-3)


@pytest.mark.parametrize("method", ["medusa", "sps", "eagle"])
def test_validation_takes_the_targets_greedy_tokens_once(tmp_path, tiny_data, toolkit, monkeypatch, method):
    """The held-out sequences' greedy tokens depend only on the frozen features, so a run computes
    them once per sequence (an LM-head pass each), not at every validation."""
    import importlib

    trainer = importlib.import_module(f"methods.{method}.train")
    calls = []
    original = trainer.target_greedy

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(trainer, "target_greedy", counted)
    opts = {"medusa": {"heads": 2}, "sps": {"layers": 1}, "eagle": {}}[method]
    cfg = TrainConfig(method=method, out=str(tmp_path / method), options=opts, max_steps=4, eval_every=2,
                      val_fraction=0.25, batch_sequences=4)
    meta = trainer.train(cfg, tiny_model("llama"), None, tiny_data, f"tiny-{method}", toolkit)
    assert len(meta["val_curve"]) == 3  # steps 0, 2 and 4, then the final figures
    assert len(calls) == meta["val_sequences"] == 3
