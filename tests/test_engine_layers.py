"""Per-layer controls of the engine: ephemeral tokens, sublayer skipping, cache bookkeeping."""

from __future__ import annotations

import copy

import pytest
import torch

from methods.core.engine import Engine, Injection

TOL = 1e-4
PREFIX = [5, 17, 3, 44, 9, 60]


def _seq(engine: Engine, ids, capture=()):
    engine.reset()
    return engine.forward(ids, commit=True, capture=capture)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_ephemeral_token_sees_context_and_real_tokens(tiny, layer):
    engine = Engine(tiny)
    a, b = 11, 23
    ref = _seq(engine, PREFIX + [a, b], capture={layer})
    h_b = ref.captured[layer][:, -1:]  # b's hidden state entering `layer`
    pos_a = len(PREFIX)

    def make(h):
        return h_b, torch.tensor([pos_a + 1]), torch.tensor([[True, True]])

    engine.reset()
    engine.forward(PREFIX, commit=True)
    out = engine.forward([a], injections=[Injection(layer, make)], commit=True)
    # the real token is unaffected, the ephemeral one reproduces b, nothing extra is cached
    assert (out.logits[0] - ref.logits[-2]).abs().max() < TOL
    assert (out.logits[1] - ref.logits[-1]).abs().max() < TOL
    assert engine.cache.length == len(PREFIX) + 1
    nxt = engine.forward([b], commit=True).logits[-1]
    assert (nxt - ref.logits[-1]).abs().max() < TOL


def test_chained_ephemeral_tokens_at_two_layers(tiny):
    """A second injection (deeper) attends to the first one; both reproduce real tokens."""
    engine = Engine(tiny)
    a, b, c = 11, 23, 31
    ref = _seq(engine, PREFIX + [a, b, c], capture={1, 2})
    h_b1 = ref.captured[1][:, -2:-1]
    pos_a = len(PREFIX)
    h_c_at_2 = ref.captured[2][:, -1:]

    engine.reset()
    engine.forward(PREFIX, commit=True)
    inj1 = Injection(1, lambda h: (h_b1, torch.tensor([pos_a + 1]), torch.tensor([[True, True]])))
    inj2 = Injection(2, lambda h: (h_c_at_2, torch.tensor([pos_a + 2]), torch.tensor([[True, True, True]])))
    out = engine.forward([a], injections=[inj1, inj2], commit=True)
    assert (out.logits[1] - ref.logits[-2]).abs().max() < TOL
    assert (out.logits[2] - ref.logits[-1]).abs().max() < TOL
    assert engine.cache.length == len(PREFIX) + 1


def test_skipping_sublayers_equals_zeroed_sublayers(tiny):
    engine = Engine(tiny)
    ids = PREFIX + [7, 8]
    engine.reset()
    got = engine.forward(ids, skip_attention={1}, skip_mlp={0, 2}).logits

    zeroed = copy.deepcopy(tiny)
    layers = zeroed.model.layers
    layers[1].self_attn.o_proj.weight.zero_()
    if layers[1].self_attn.o_proj.bias is not None:
        layers[1].self_attn.o_proj.bias.zero_()
    layers[0].mlp.down_proj.weight.zero_()
    layers[2].mlp.down_proj.weight.zero_()
    ref = _seq(Engine(zeroed), ids).logits
    assert (got - ref).abs().max() < TOL


def test_engine_matches_transformers_forward(tiny):
    ids = PREFIX + [1, 2, 3]
    ref = tiny(torch.tensor([ids])).logits[0]
    got = _seq(Engine(tiny), ids).logits
    assert (got - ref).abs().max() < TOL


def test_incremental_decode_matches_full_forward(tiny):
    engine = Engine(tiny, capacity=4)
    ids = PREFIX + [1, 2, 3, 4, 5]
    full = _seq(engine, ids).logits
    engine.reset()
    engine.forward(ids[:3], commit=True)
    rows = [engine.forward([t], commit=True).logits[-1] for t in ids[3:]]
    assert (torch.stack(rows) - full[3:]).abs().max() < TOL


def test_rollback_and_keep_bookkeeping(tiny):
    engine = Engine(tiny)
    engine.reset()
    engine.forward(PREFIX, commit=True)
    engine.cache.rollback(2)
    assert engine.cache.length == len(PREFIX) - 2
    with pytest.raises(ValueError):
        engine.cache.rollback(100)
    engine.forward([1, 2, 3])
    engine.cache.keep([0, 2])
    assert engine.cache.length == len(PREFIX)


def test_lm_head_takes_the_few_rows_route_in_float32_and_matches_linear(monkeypatch):
    """A few float32 rows on a CPU go through (W @ x^T)^T (benchmarks/skinny_matmul.py: 2-6x
    faster there), with F.linear's values; many rows, bf16 and training keep F.linear."""
    import torch.nn.functional as F

    from methods.core.engine import FEW_ROWS, LMHead

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 300, bias=False)
    head = LMHead(linear)
    assert LMHead(head).head is linear
    for rows in (1, 2, 3, FEW_ROWS, FEW_ROWS + 1):
        x = torch.randn(rows, 32)
        with torch.no_grad():
            assert torch.allclose(head(x), F.linear(x, linear.weight), atol=1e-5)
            assert head(x[None]).shape == (1, rows, 300)
    calls = []
    monkeypatch.setattr(linear, "forward", lambda x: calls.append(x.shape[0]) or F.linear(x, linear.weight))
    with torch.no_grad():
        head(torch.randn(3, 32))
        head(torch.randn(FEW_ROWS + 1, 32))
        LMHead(linear.to(torch.bfloat16))(torch.randn(2, 32, dtype=torch.bfloat16))
    assert calls == [FEW_ROWS + 1, 2]


def test_engine_routes_its_layer_projections_through_the_few_rows_kernel(monkeypatch):
    """The engine turns each decoder layer's nn.Linear into a FewRowsLinear in place: the same
    parameters and state-dict keys, F.linear's values, the (W @ x^T)^T route for 1..FEW_ROWS_LAYER
    float32 rows only; and a whole pass still matches the model's own forward."""
    import torch.nn.functional as F

    from methods.core import engine as engine_module
    from methods.core.engine import FEW_ROWS_LAYER, FewRowsLinear
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    keys = list(model.state_dict())
    engine = Engine(model)
    Engine(model)  # idempotent
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is FewRowsLinear and isinstance(q, torch.nn.Linear) and list(model.state_dict()) == keys
    assert all(type(m) is not torch.nn.Linear for layer in model.model.layers for m in layer.modules())
    routed = []
    real = engine_module.few_rows_product

    def spy(x, *args):
        out = real(x, *args)
        if out is not None:
            routed.append(x.shape[-2])
        return out

    monkeypatch.setattr(engine_module, "few_rows_product", spy)
    with torch.no_grad():
        for rows in (1, 2, FEW_ROWS_LAYER, FEW_ROWS_LAYER + 1):
            x = torch.randn(1, rows, q.in_features)
            got = q(x)
            assert got.shape == (1, rows, q.out_features)
            assert torch.allclose(got, F.linear(x, q.weight, q.bias), atol=1e-5)
        q.to(torch.bfloat16)(torch.randn(2, q.in_features, dtype=torch.bfloat16))  # bf16 keeps F.linear
        q.float()
    assert routed == [1, 2, FEW_ROWS_LAYER]
    x = torch.randn(2, q.in_features, requires_grad=True)
    q(x).sum().backward()  # training keeps F.linear and its gradients
    assert x.grad is not None and routed == [1, 2, FEW_ROWS_LAYER]
    ids = torch.tensor([PREFIX])
    with torch.no_grad():
        want = model(input_ids=ids).logits[0, -3:]
        engine.reset()
        engine.forward(PREFIX[:-3], commit=True)
        got = engine.forward(PREFIX[-3:]).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_engine_stacks_qkv_and_gate_up_as_views_without_a_second_copy():
    """The layer loop multiplies q/k/v and gate/up as one product each; the modules' own
    parameters become views of the stacked weights, so the model holds its weights once and its
    own forward (training, ``generate``) reads the same values."""
    from methods.core.engine import fuse_linears
    from tests.conftest import tiny_model

    model = tiny_model("qwen2")  # q/k/v carry biases
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    weights = engine._weights[1]
    base = weights.qkv.untyped_storage().data_ptr()
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert lin.weight.untyped_storage().data_ptr() == base
        assert lin.bias.untyped_storage().data_ptr() == weights.qkv_bias.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == weights.gate_up.untyped_storage().data_ptr()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])[0] is weights.qkv  # a second engine reuses them
    with torch.no_grad():
        attn.k_proj.weight.mul_(2)  # a write through the module is what the engine reads
    assert torch.equal(weights.qkv[attn.q_proj.weight.shape[0]:][: attn.k_proj.weight.shape[0]], attn.k_proj.weight)
    ids = torch.tensor([PREFIX])
    with torch.no_grad():
        assert (model(input_ids=ids).logits[0] - _seq(engine, PREFIX).logits).abs().max() < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_rms_norm_is_bit_identical_to_the_models(dtype):
    from methods.core.engine import RMSNorm
    from tests.conftest import tiny_model

    model = tiny_model("llama").to(dtype)
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(5, norm.weight.shape[0]).to(dtype)
        assert torch.equal(RMSNorm(norm)(x), norm(x))


def test_low_precision_rows_go_through_float32_only_without_bf16_units(monkeypatch):
    """On a CPU without bf16 arithmetic a bf16 product of several rows runs on a float32 copy of the
    weight (the emulated bf16 GEMM grows with the rows); one row, float32 weights and CPUs with
    bf16 units keep their native kernels."""
    import torch.nn.functional as F

    from methods.core import engine as engine_module

    torch.manual_seed(0)
    weight = torch.randn(300, 32).bfloat16()
    rows = engine_module.UPCAST_FROM
    x = torch.randn(rows, 32).bfloat16()
    monkeypatch.setattr(engine_module, "_NATIVE", [False])
    got = engine_module.upcast_product(x, weight, None)
    want = F.linear(x.float(), weight.float()).bfloat16()
    assert got is not None and got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert engine_module.upcast_product(x[:1], weight, None) is None
    assert engine_module.upcast_product(x.float(), weight.float(), None) is None
    monkeypatch.setattr(engine_module, "_NATIVE", [True])
    assert engine_module.upcast_product(x, weight, None) is None
    # a whole bf16 tree pass through the route stays within bf16 rounding of the native one
    from tests.conftest import tiny_model

    engine = Engine(tiny_model("llama").to(torch.bfloat16))
    engine.reset()
    engine.forward(PREFIX, commit=True)
    native = engine.forward([1, 2, 3, 4, 5]).logits
    monkeypatch.setattr(engine_module, "_NATIVE", [False])
    upcast = engine.forward([1, 2, 3, 4, 5]).logits
    assert (native - upcast).abs().max() < 0.1 * native.abs().max()


def test_sliding_window_layers_match_transformers():
    """A Mistral layer sees only the last ``sliding_window`` positions: the prefill, one-token
    steps and a tree pass past the window give the Hugging Face model's logits, and the same
    engine without the window does not (the test reaches where the window matters)."""
    from methods.core.tree import TreeLayout, parse_tree
    from tests.conftest import tiny_model

    model = tiny_model("mistral")
    assert model.config.sliding_window == 8
    seq = [(7 * i + 3) % 97 for i in range(40)]
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0]

    def decode(engine: Engine) -> list[torch.Tensor]:
        engine.reset()
        got = [engine.forward(seq[:20], commit=True).logits]                     # a prefill longer than the window
        got += [engine.forward([seq[t]], commit=True).logits for t in range(20, 30)]  # one query at a time
        got.append(engine.forward(seq[30:34]).logits)                            # a causal block
        return got

    got = torch.cat(decode(Engine(model)))
    assert (got - ref[:34]).abs().max() < TOL
    unwindowed = Engine(model)
    unwindowed._windows = [None] * len(unwindowed._windows)
    assert (torch.cat(decode(unwindowed)) - ref[:34]).abs().max() > 100 * TOL
    # a tree after 30 cached tokens: each branch sees the window of its own positions
    engine = Engine(model)
    engine.reset()
    engine.forward(seq[:30], commit=True)
    tree = parse_tree("2x1")
    layout = TreeLayout.from_tree(tree, engine)
    nodes = [seq[30]] + [(13 * i + 50) % 97 for i in range(tree.size - 1)]  # the root, then any tokens
    out = engine.forward(nodes, position_ids=layout.positions + 30, step_bias=layout.bias).logits
    parents = tree.parents.tolist()
    for i in range(tree.size):
        branch, cur = [], i
        while cur >= 0:
            branch.insert(0, nodes[cur])
            cur = parents[cur]
        with torch.no_grad():
            alone = model(torch.tensor([seq[:30] + branch])).logits[0, -1]
        assert (out[i] - alone).abs().max() < TOL, f"node {i}"


def test_passes_on_cuda_leave_out_cudnn_attention():
    """On CUDA every engine pass (one sequence or a batch) runs SDPA without cuDNN's backend, which
    builds a graph per new shape; on a CPU the backends are left as they are."""
    from methods.core.engine import attention_backends

    flags = (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.flash_sdp_enabled,
             torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before = [f() for f in flags]
    with attention_backends(torch.device("cuda")):
        assert [f() for f in flags] == [False, True, True, True]
    assert [f() for f in flags] == before
    with attention_backends(torch.device("cpu")):
        assert [f() for f in flags] == before


def test_every_engine_pass_enters_the_attention_backends_once(monkeypatch):
    from methods.core import engine as engine_module
    from methods.core.batch import Request, serve
    from methods.core.decoder import GenConfig
    from methods.core.engine import Engine
    from methods.vanilla import VanillaDecoder
    from tests.conftest import tiny_model

    entered = []
    real = engine_module.attention_backends

    def spy(device):
        entered.append(device.type)
        return real(device)

    monkeypatch.setattr(engine_module, "attention_backends", spy)
    engine = Engine(tiny_model("llama"))
    engine.forward([1, 2, 3], commit=True)
    assert entered == ["cpu"]
    entered.clear()
    run = serve(VanillaDecoder(engine), [Request([1, 2, 3], GenConfig(4)), Request([4, 5], GenConfig(4))], 2,
                adapt=False)
    assert len(entered) == 2 + len(run.batch_sizes)  # two prefills, then one per batched pass
