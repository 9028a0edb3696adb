"""The same checks on a CUDA device, in float32 and bfloat16 (skipped where there is no GPU).

Run by ``benchmarks/gpu_check.sh`` on a GPU machine; CI stays CPU-only and skips them.
"""

from __future__ import annotations

import pytest
import torch

from methods.core.decoder import GenConfig
from methods.core.engine import Engine
from methods.core.tree import Tree
from tests.conftest import tiny_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_tree_forward_matches_each_branch_on_cuda(kind, dtype):
    model = tiny_model(kind).to("cuda", DTYPES[dtype])
    engine = Engine(model, capacity=16)
    tol = 1e-3 if dtype == "float32" else 3e-2
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        n = int(torch.randint(1, 12, (1,), generator=g))
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n + 1)]
        tree = Tree.from_parents(parents)
        prefix = torch.randint(0, 97, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        tokens = torch.randint(0, 97, (tree.size,), generator=g).tolist()
        engine.reset()
        engine.forward(prefix, commit=True)
        out = engine.forward(tokens, position_ids=tree.depths.cuda() + len(prefix),
                             step_bias=engine.tree_bias(tree.visible))
        for row in tree.retrieve.tolist():
            branch = [i for i in row if i >= 0]
            engine.reset()
            ref = engine.forward(prefix + [tokens[i] for i in branch], commit=True).logits[len(prefix):]
            assert (out.logits[branch] - ref).abs().max().item() < tol


def _agree_or_near_tie(model32, prompt: list[int], ref: list[int], got: list[int], dtype: str) -> None:
    """fp32: identical ids. bf16: identical up to a first divergence that float32 calls a near-tie."""
    if got == ref or dtype == "float32":
        assert got == ref
        return
    pos = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    assert pos < min(len(ref), len(got)), "one output is a prefix of the other"
    with torch.no_grad():
        logits = model32(torch.tensor([prompt + ref[:pos]], device="cuda")).logits[0, -1].float()
    gap = abs(float(logits[ref[pos]] - logits[got[pos]]))
    assert gap < 0.02 * float(logits.abs().max()), f"real divergence at {pos}: float32 gap {gap:.4f}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["pld", "lookahead", "medusa", "firp", "self_spec", "eagle", "sps"])
def test_methods_are_lossless_on_cuda(method, dtype, tmp_path):
    from tests.test_decode_loop import _decoders, _sampling_model
    from methods.vanilla import VanillaDecoder

    model32 = _sampling_model().to("cuda")
    model = _sampling_model().to("cuda", DTYPES[dtype])
    engine = Engine(model)
    decoder = _decoders(engine, tmp_path)[method]
    vanilla = VanillaDecoder(engine)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        prompt = torch.randint(0, 12, (8,), generator=g).tolist()
        ref = vanilla.generate(prompt, 30).tokens
        got = decoder.generate(prompt, 30)
        _agree_or_near_tie(model32, prompt, ref, got.tokens, dtype)
        assert len(got.step_times) == len(got.accepted) and all(t > 0 for t in got.step_times)
    # sampling runs on the device too, seeded and reproducible
    a = decoder.generate(prompt, GenConfig(12, temperature=0.8, seed=3)).tokens
    b = decoder.generate(prompt, GenConfig(12, temperature=0.8, seed=3)).tokens
    assert a == b


def under_load(method: str, dtype: str, device: str, tmp_path) -> None:
    """Six prompts of different lengths at concurrency 3 and 6: each request gets what vanilla
    gives it alone (float32: the same ids; bf16: up to a near-tie that float32 confirms)."""
    from methods.core.batch import Request, serve
    from methods.vanilla import VanillaDecoder
    from tests.test_decode_loop import _decoders, _sampling_model

    model32 = _sampling_model().to(device)
    engine = Engine(_sampling_model().to(device, DTYPES[dtype]))
    decoder = _decoders(engine, tmp_path)[method]
    vanilla = VanillaDecoder(engine)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 12, (n,), generator=g).tolist() for n in (6, 9, 4, 12, 7, 5)]
    want = [vanilla.generate(p, 24).tokens for p in prompts]
    for level in (3, 6):
        run = serve(decoder, [Request(p, GenConfig(24)) for p in prompts], level, adapt=False)
        assert max(run.batch_sizes) == level
        if method != "vanilla":  # drafts were taken, so a wrong batched mask or keep shows up
            assert any(a > 1 for s in run.served for a in s.generation.accepted), method
        for p, ref, served in zip(prompts, want, run.served):
            _agree_or_near_tie(model32, p, ref, served.generation.tokens, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["vanilla", "pld", "lookahead", "medusa", "firp", "self_spec", "eagle", "sps"])
def test_every_method_under_load_on_cuda(method, dtype, tmp_path):
    under_load(method, dtype, "cuda", tmp_path)


def test_masked_passes_run_no_cudnn_attention(tmp_path):
    """Tree and batched passes (additive masks) run SDPA without cuDNN's backend, which builds a
    graph for every new key length (``methods.core.engine.attention_backends``)."""
    from torch.profiler import ProfilerActivity, profile

    from methods.core.batch import Request, serve
    from tests.test_decode_loop import _decoders, _sampling_model

    engine = Engine(_sampling_model().to("cuda", torch.bfloat16))
    decoder = _decoders(engine, tmp_path)["medusa"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decoder.generate(list(range(8)), 12)
        serve(decoder, [Request(list(range(n)), GenConfig(12)) for n in (5, 9, 7)], 3, adapt=False)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert any("attention" in n for n in names), names  # the profile sees the attention ops at all
    assert not [n for n in names if "cudnn" in n.lower() and "attention" in n.lower()]
