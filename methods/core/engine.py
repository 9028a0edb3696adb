"""The one backbone runner that every decoder, the vanilla baseline included, goes through.

It drives the Hugging Face model's *own* decoder-layer modules (norms, attention, MLP)
in a layer loop of ours, on our ``KVCache``. Owning the loop is what lets methods:

* verify a token tree in one pass (float additive 4D mask + explicit position ids);
* keep any subset of the step's tokens afterwards (``KVCache.keep``);
* add *ephemeral* tokens at an intermediate layer that ride through the later layers
  and are never committed (FIRP's pseudo hidden states);
* skip chosen attention / MLP sublayers (self-speculative drafting).

Because the baseline runs through exactly the same code, any speedup a method shows
comes from the method and not from a faster cache or mask path.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from methods.core.kv_cache import KVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# What attention modules call their cache argument, newest transformers first (5.2x: ``cache``).
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


def cache_keyword(attention: nn.Module) -> str:
    """The keyword this transformers version's attention takes its KV cache under."""
    params = inspect.signature(attention.forward).parameters
    for name in _CACHE_KEYWORDS:
        if name in params:
            return name
    raise ValueError(f"{type(attention).__name__}.forward takes no cache argument ({', '.join(_CACHE_KEYWORDS)}); "
                     "this transformers version is not supported")


@dataclass
class Injection:
    """Ephemeral tokens entering at ``layer`` (before that layer runs).

    ``make(hidden)`` receives the hidden states of every token present at that point,
    shape [1, n_cur, d], and returns ``(extra_hidden [1, m, d], extra_positions [m],
    visible [m, n_cur + m] bool)``: which of this step's tokens (including earlier
    ephemeral ones and the new ones themselves) each new token attends to. The cached
    context is always visible; real tokens never see ephemeral ones.
    """

    layer: int
    make: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


NO_CUDNN_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """SDPA's kernels for a pass on ``device``: on CUDA every backend but cuDNN's; elsewhere unchanged.

    Why: given an additive mask (a tree, a batch of slots), PyTorch's CUDA SDPA takes cuDNN's
    attention on Hopper, and cuDNN builds an execution graph for every new shape, tens of
    milliseconds each. A decode step's key length grows with every accepted token, so nearly
    every masked pass of a real run is a new shape, while a benchmark that warms up at the
    measured length hides it. The memory-efficient kernel takes the same masks with nothing
    built per shape (``benchmarks/load_profile.py`` shows which kernel a step runs)."""
    return sdpa_kernel(NO_CUDNN_ATTENTION) if device.type == "cuda" else contextlib.nullcontext()


def with_attention_backends(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an engine's pass (``self.device``) under ``attention_backends``: once a pass, not a layer."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with attention_backends(self.device):
            return method(self, *args, **kwargs)

    return run


@dataclass
class ForwardOutput:
    """What one engine pass returns. ``hidden`` is after the final norm, real tokens first."""

    logits: torch.Tensor | None
    hidden: torch.Tensor
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


FEW_ROWS = 64  # the LM head's limit: (W @ x^T)^T stays ahead of F.linear up to 48 rows there
FEW_ROWS_LAYER = 6  # a decoder layer's projections: F.linear catches up at about 8 rows


def few_rows_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     limit: int) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` as ``(W @ x^T)^T`` for 1..``limit`` float32 rows on a CPU;
    ``None`` where ``F.linear`` is the better kernel (more rows, another dtype or device, autograd).

    Why: a decode step multiplies one or a few rows by every weight matrix, and the weights
    come from DRAM. For one row ``F.linear`` takes a matrix-vector kernel and for a few rows a
    GEMM that packs (copies) the large weight first; with the product written the other way
    round the few rows are the packed operand and the weight streams once.
    ``benchmarks/skinny_matmul.py --model-walk`` measures both forms over a whole model's layer
    projections; in bfloat16 they are within noise, so bf16 keeps ``F.linear``.
    """
    rows = x.numel() // x.shape[-1]
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not 0 < rows <= limit or (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:  # a matrix-vector product is the slow kernel here: pad to two rows
        flat = torch.cat([flat, torch.zeros_like(flat)])
    out = (weight @ flat.T).T[:rows].contiguous()
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


UPCAST_FROM = 4  # rows from which a bf16/fp16 product on a CPU without bf16 units runs in float32
_shadows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def upcast_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` for ``UPCAST_FROM`` or more rows of a bf16/fp16 weight on a CPU whose
    vector units have no bf16 arithmetic, through a float32 copy of the weight; ``None`` elsewhere.

    Why: there the low-precision GEMM is emulated and its time grows with the rows almost as if
    each row were its own pass, so verifying a tree costs several one-token passes and
    speculation cannot pay. The float32 copy is exact (every bf16/fp16 value is a float32
    value), the product accumulates in float32 as the native kernel does, and the output is
    rounded to the model's dtype. One row keeps the native matrix-vector kernel, which streams
    the weight at its low-precision size."""
    rows = x.numel() // x.shape[-1]
    if rows < UPCAST_FROM or weight.dtype not in (torch.bfloat16, torch.float16) or weight.device.type != "cpu" \
            or _native_low_precision() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    shadow = _shadows.get(id(weight))
    if shadow is None or shadow[0] is not weight:
        shadow = _shadows[id(weight)] = (weight, weight.float())
    wide = shadow[1]
    xf = x.reshape(rows, x.shape[-1]).float()
    out = few_rows_product(xf, wide, None, 1 << 30)
    if bias is not None:
        out = out + bias.float()
    return out.to(weight.dtype).view(*x.shape[:-1], weight.shape[0])


_NATIVE: list[bool] = []


def _native_low_precision() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), probed once."""
    if not _NATIVE:
        from methods.core.hardware import cpu_has_native_bf16

        _NATIVE.append(cpu_has_native_bf16())
    return _NATIVE[0]


class FewRowsLinear(nn.Linear):
    """An ``nn.Linear`` that takes ``few_rows_product`` when it is the faster kernel.

    The engine turns a decoder layer's own ``nn.Linear`` modules into this class in place
    (``route_few_rows``): same parameters, same state-dict keys, still an ``nn.Linear``, so
    training, ``generate`` and weight loading see the model they had.
    """

    few_rows = FEW_ROWS_LAYER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = few_rows_product(x, self.weight, self.bias, self.few_rows)
        return super().forward(x) if out is None else out


def route_few_rows(layers: Sequence[nn.Module]) -> None:
    """Every plain ``nn.Linear`` in ``layers`` becomes a ``FewRowsLinear`` (idempotent)."""
    for layer in layers:
        for module in layer.modules():
            if type(module) is nn.Linear:
                module.__class__ = FewRowsLinear


class UpcastLinear(nn.Linear):
    """An ``nn.Linear`` whose many-row bf16/fp16 products take ``upcast_product`` (see ``upcast_linears``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = upcast_product(x, self.weight, self.bias)
        return super().forward(x) if out is None else out


@contextlib.contextmanager
def upcast_linears(model: nn.Module) -> Iterator[None]:
    """Within the block, the plain ``nn.Linear`` modules of ``model`` run many-row products through
    ``upcast_product``; restored on exit.

    Why: a whole-sequence pass of a bf16 model outside the engine (the trainers' feature cache)
    is one large GEMM per projection, which a CPU without bf16 arithmetic emulates several times
    slower than the float32 product of the same values; the outputs are still rounded to the
    model's dtype, so the cached features are the bf16 model's. A no-op where the CPU has bf16
    units or the model is float32 (``upcast_product`` declines)."""
    swapped = [m for m in model.modules() if type(m) is nn.Linear]
    for module in swapped:
        module.__class__ = UpcastLinear
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.Linear
            _shadows.pop(id(module.weight), None)


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, limit: int) -> torch.Tensor:
    """``F.linear`` with the few-rows route of ``few_rows_product`` where that is the faster kernel."""
    out = few_rows_product(x, weight, bias, limit)
    if out is None:
        out = upcast_product(x, weight, bias)
    return F.linear(x, weight, bias) if out is None else out


class RMSNorm:
    """A model's RMSNorm computed as transformers computes it (float32 statistics, the weight applied
    in the model's dtype; bit-identical), in two operator calls instead of six."""

    def __init__(self, module: nn.Module) -> None:
        self.weight = module.weight
        self.eps = float(module.variance_epsilon)
        self.shape = (self.weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)

    @classmethod
    def of(cls, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """This class for an RMSNorm; any other norm (a draft head's ``nn.Identity``) is called as it is."""
        return cls(module) if isinstance(getattr(module, "weight", None), torch.Tensor) and \
            hasattr(module, "variance_epsilon") else module


def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for projections that read the same input, stacked by rows.

    The modules' parameters become views into the stacked tensor, so the model holds its weights
    once and every other user of the modules (training, ``generate``, state dicts) sees the same
    values. Calling it again on the same modules returns the same tensors. Why: a decode step
    pays a fixed dispatch cost per product, and one product over q, k and v (or gate and up)
    streams the same bytes as three."""
    first = linears[0]
    stacked = getattr(first, "_fused_weight", None)
    rows = sum(lin.weight.shape[0] for lin in linears)
    if stacked is not None and stacked[0].shape[0] == rows and stacked[0].data_ptr() == first.weight.data_ptr() \
            and stacked[0].dtype == first.weight.dtype:
        return stacked
    with torch.no_grad():
        weight = torch.cat([lin.weight.detach() for lin in linears]).contiguous()
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat([lin.bias.detach() if lin.bias is not None else
                              torch.zeros(lin.weight.shape[0], dtype=weight.dtype, device=weight.device)
                              for lin in linears])
    start = 0
    for lin in linears:
        stop = start + lin.weight.shape[0]
        lin.weight.data = weight[start:stop]
        if lin.bias is not None:
            lin.bias.data = bias[start:stop]
        start = stop
    first._fused_weight = (weight, bias)
    return weight, bias


@dataclass
class LayerWeights:
    """What the engine's layer loop reads of one decoder layer: its norms and its projections, q/k/v
    and gate/up each stacked into one product (``fuse_linears``)."""

    attn_norm: Callable[[torch.Tensor], torch.Tensor]
    mlp_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer: nn.Module) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up, gate_up_bias = fuse_linears([mlp.gate_proj, mlp.up_proj])
        return cls(RMSNorm.of(layer.input_layernorm), RMSNorm.of(layer.post_attention_layernorm), qkv, qkv_bias,
                   attn.o_proj.weight, attn.o_proj.bias, gate_up, gate_up_bias, mlp.down_proj.weight,
                   mlp.down_proj.bias, mlp.act_fn)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LMHead(nn.Module):
    """The model's LM head, with the few-rows route of ``few_rows_product`` up to ``FEW_ROWS`` rows.

    The head is the largest single matrix a step reads (49152 x 576 for the default model), so
    the route pays most here and stays ahead of ``F.linear`` to more rows than in a layer
    (``benchmarks/skinny_matmul.py``). Every decoder, the vanilla baseline included, decodes
    through this head and these layers, so the baseline gains what the methods gain.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head.head if isinstance(head, LMHead) else head  # a draft engine sharing the target's

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = few_rows_product(x, self.head.weight, self.head.bias, FEW_ROWS)
        if out is None:
            out = upcast_product(x, self.head.weight, self.head.bias)
        return self.head(x) if out is None else out


def sliding_windows(config: Any) -> list[int | None]:
    """Each layer's attention window (None: the whole context), as the Hugging Face model applies
    it: ``layer_types`` where the config lists them (Qwen2 with ``use_sliding_window``), else
    ``sliding_window`` on every layer (Mistral)."""
    window = getattr(config, "sliding_window", None)
    layers = config.num_hidden_layers
    if not window:
        return [None] * layers
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list) and len(kinds) == layers:
        return [window if kind == "sliding_attention" else None for kind in kinds]
    return [window] * layers


class Engine:
    """Batch-size-1 layer loop over a Llama-family model with a preallocated KV cache.

    The loop reads each layer's weights directly (``LayerWeights``: q/k/v and gate/up stacked
    into one product each, norms in two operator calls) instead of calling the Hugging Face
    modules: a decode step of a small model is otherwise dominated by the hundreds of small
    operator calls around the products, not by streaming the weights. Numerics are those of the
    modules (same operations in the same order); ``tests/test_engine_layers.py`` holds the
    engine's logits to the model's own forward."""

    def __init__(self, model: nn.Module, *, capacity: int = 512) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {config.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model.eval()
        self.config = config
        backbone = model.model
        self.embed_tokens = backbone.embed_tokens
        self.layers = list(backbone.layers)
        route_few_rows(self.layers)
        self._weights = [LayerWeights.of(layer) for layer in self.layers]
        self.norm = backbone.norm
        self._final_norm = RMSNorm.of(backbone.norm)
        self.lm_head = LMHead(model.lm_head)
        self.rotary = backbone.rotary_emb
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.neg_inf = torch.finfo(self.dtype).min
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._heads, self._kv_heads, self._head_dim = config.num_attention_heads, config.num_key_value_heads, head_dim
        self._windows = sliding_windows(config)
        self._scaling = float(getattr(self.layers[0].self_attn, "scaling", head_dim ** -0.5))
        self.cache = KVCache(
            len(self.layers),
            config.num_key_value_heads,
            head_dim,
            dtype=self.dtype,
            device=self.device,
            capacity=capacity,
        )
        # Rotary tables are a pure function of position for static RoPE variants, so
        # they are computed once and indexed per step instead of recomputed per call.
        self._causal_blocks: dict[int, torch.Tensor] = {}
        self._mask_buf: torch.Tensor | None = None
        self._mask_dirty: tuple[int, int, int] | None = None
        self._rope_static = getattr(self.rotary, "rope_type", "default") != "dynamic"
        self._cos = self._sin = None
        self._ensure_rope(capacity)

    def fork(self, cache: KVCache | None = None) -> Engine:
        """This engine's model and weights on another cache (``cache``, or a new one of the same
        shape): a sequence of a batch runs on a slot of the batch's cache through the same layer
        loop, and a slot's draft engine (EAGLE's head, SpS's draft model) gets a cache of its own."""
        twin = copy.copy(self)
        twin.cache = cache if cache is not None else KVCache(
            self.num_layers, self._kv_heads, self._head_dim, dtype=self.dtype, device=self.device,
            capacity=self.cache.capacity)
        twin._mask_buf, twin._mask_dirty = None, None
        return twin

    # -- helpers --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _ensure_rope(self, positions: int) -> None:
        if not self._rope_static or (self._cos is not None and self._cos.shape[0] >= positions):
            return
        size = max(positions, 2 * (0 if self._cos is None else self._cos.shape[0]), 512)
        pos = torch.arange(size, device=self.device)[None]
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, pos)
        self._cos, self._sin = cos[0], sin[0]

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_static:
            return self._cos[position_ids], self._sin[position_ids]
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, position_ids[None])
        return cos[0], sin[0]

    def tree_bias(self, visible: torch.Tensor) -> torch.Tensor:
        """Turn a bool visibility matrix [n, n] into the float additive mask block decoders cache."""
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(visible.to(self.device), zero, torch.tensor(self.neg_inf, dtype=self.dtype, device=self.device))

    def _causal(self, n: int) -> torch.Tensor:
        """The [n, n] causal block, built once per size."""
        block = self._causal_blocks.get(n)
        if block is None:
            block = torch.full((n, n), self.neg_inf, dtype=self.dtype, device=self.device).triu_(1)
            self._causal_blocks[n] = block
        return block

    def _mask(self, n: int, past: int, step_bias: torch.Tensor | None) -> torch.Tensor | None:
        """The step's additive mask as a view of one preallocated buffer (no allocation per step).

        None where attention is plainly causal from the start (prefill) or a single query sees
        the whole cache: then SDPA picks its fused kernels.
        """
        if step_bias is None:
            if n == 1 or past == 0:
                return None
            step_bias = self._causal(n)
        rows, cols = n, past + n
        buf = self._mask_buf
        if buf is None or buf.shape[0] < rows or buf.shape[1] < cols:
            buf = self._mask_buf = torch.zeros((max(rows, 64), max(cols, 2 * self.cache.capacity)),
                                               dtype=self.dtype, device=self.device)
        if self._mask_dirty is not None:  # the previous step's block back to "visible"
            r, c0, c1 = self._mask_dirty
            buf[:r, c0:c1] = 0
        buf[:rows, past:cols] = step_bias
        self._mask_dirty = (rows, past, cols)
        return buf[:rows, :cols][None, None]

    def _extend_mask(
        self, mask: torch.Tensor | None, n_cur: int, past: int, visible: torch.Tensor
    ) -> torch.Tensor:
        m = visible.shape[0]
        total = past + n_cur + m
        out = torch.full((n_cur + m, total), self.neg_inf, dtype=self.dtype, device=self.device)
        if mask is None:  # one query saw everything before it, or a causal prefill
            out[:n_cur, :past] = 0
            out[:n_cur, past: past + n_cur] = self._causal(n_cur)
        else:
            out[:n_cur, : past + n_cur] = mask[0, 0]
        out[n_cur:, :past] = 0
        out[n_cur:, past:] = self.tree_bias(visible)
        return out[None, None]

    def _windowed(self, mask: torch.Tensor | None, position_ids: torch.Tensor, past: int,
                  window: int) -> torch.Tensor | None:
        """``mask`` with keys ``window`` or more positions behind a query hidden (a sliding-window
        layer, as Mistral's). Positions never exceed ``past`` + rows, so below the window the
        mask is returned as it is and the common case costs nothing."""
        n = position_ids.shape[0]
        if past + n <= window:
            return mask
        keys = torch.cat([torch.arange(past, device=self.device), position_ids])
        far = (position_ids[:, None] - keys[None, :]) >= window
        if mask is None:  # one query on the whole cache, or a causal prefill
            mask = torch.zeros((n, past + n), dtype=self.dtype, device=self.device)
            if n > 1:
                mask[:, past:] = self._causal(n)
            mask = mask[None, None]
        return mask.masked_fill(far[None, None], self.neg_inf)

    # -- the pass ---------------------------------------------------------------------------
    @torch.no_grad()
    @with_attention_backends
    def forward(
        self,
        input_ids: torch.Tensor | Sequence[int],
        *,
        position_ids: torch.Tensor | None = None,
        step_bias: torch.Tensor | None = None,
        logits_rows: slice | torch.Tensor | None = None,
        want_logits: bool = True,
        injections: Sequence[Injection] = (),
        skip_attention: Collection[int] = (),
        skip_mlp: Collection[int] = (),
        capture: Collection[int] = (),
        commit: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        past_bias: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Run the new tokens through the model after the committed cache.

        ``step_bias`` is the float additive mask among the new tokens ([n, n]; causal if
        omitted); ``position_ids`` default to consecutive positions. ``capture`` returns the
        hidden states *entering* those layers (index ``num_layers`` = before the final norm).
        The step's tokens stay pending unless ``commit``; use ``cache.keep`` for a branch.
        ``inputs_embeds`` [n, d] replaces the embedding of ``input_ids`` (a draft head's fused
        inputs); ``past_bias`` [n, past] masks part of the cached context (a drafter's own
        scratch tokens of other branches).
        """
        if inputs_embeds is not None:
            n = inputs_embeds.shape[0]
        else:
            if not isinstance(input_ids, torch.Tensor):
                input_ids = torch.tensor(input_ids, dtype=torch.long)
            input_ids = input_ids.to(self.device).view(-1)
            n = input_ids.shape[0]
        cache = self.cache
        past = cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=self.device)
        else:
            position_ids = position_ids.to(self.device)
        cache.reserve(past + n)
        self._ensure_rope(past + n)

        h = self.embed_tokens(input_ids[None]) if inputs_embeds is None else inputs_embeds[None].to(self.dtype)
        if past_bias is None:
            mask = self._mask(n, past, step_bias)
        else:
            mask = torch.cat([past_bias.to(self.dtype), self._causal(n) if step_bias is None else step_bias], dim=1)[None, None]
        rope = self._rope(position_ids)
        windowed: dict[int, torch.Tensor | None] = {}  # this step's mask per window size, built on first use
        by_layer = {inj.layer: inj for inj in injections}
        captured: dict[int, torch.Tensor] = {}
        for i, weights in enumerate(self._weights):
            if i in capture:
                captured[i] = h
            inj = by_layer.get(i)
            if inj is not None:
                extra_h, extra_pos, visible = inj.make(h)
                cache.reserve(past + h.shape[1] + extra_h.shape[1])
                # ephemeral tokens sit at most a chain's length past the real ones: no device read needed
                self._ensure_rope(past + h.shape[1] + extra_h.shape[1])
                mask = self._extend_mask(mask, h.shape[1], past, visible)
                h = torch.cat([h, extra_h.to(h.dtype)], dim=1)
                position_ids = torch.cat([position_ids, extra_pos.to(self.device)])
                rope = self._rope(position_ids)
                windowed.clear()
            x = h[0]
            if i not in skip_attention:
                window = self._windows[i]
                layer_mask = mask
                if window is not None:
                    if window not in windowed:
                        windowed[window] = self._windowed(mask, position_ids, past, window)
                    layer_mask = windowed[window]
                x = x + self._attention(i, weights, weights.attn_norm(x), rope, layer_mask)
            if i not in skip_mlp:
                x = x + self._mlp(weights, weights.mlp_norm(x))
            h = x[None]
        if self.num_layers in capture:
            captured[self.num_layers] = h
        hidden = self._final_norm(h[0])
        logits = None
        if want_logits:
            rows = hidden if logits_rows is None else hidden[logits_rows]
            logits = self.lm_head(rows).float()
        if commit:
            cache.commit(n)
        return ForwardOutput(logits=logits, hidden=hidden, captured=captured)

    def _attention(self, i: int, w: LayerWeights, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   mask: torch.Tensor | None) -> torch.Tensor:
        """Self-attention of the step's rows ``x`` [n, d] on the cache: one fused QKV product, RoPE on
        queries and keys together, the new keys and values written once, one SDPA call."""
        n = x.shape[0]
        heads, kv_heads, dim = self._heads, self._kv_heads, self._head_dim
        qkv = few_rows_linear(x, w.qkv, w.qkv_bias, FEW_ROWS_LAYER)
        qk = qkv[:, : (heads + kv_heads) * dim].view(n, heads + kv_heads, dim)
        cos, sin = rope
        qk = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]
        keys, values = self.cache.update(qk[:, heads:].transpose(0, 1)[None],
                                         qkv[:, (heads + kv_heads) * dim:].view(n, kv_heads, dim).transpose(0, 1)[None], i)
        q = qk[:, :heads]
        if n == 1 and mask is None:  # one query sees the whole cache: the query heads grouped by key head
            out = F.scaled_dot_product_attention(q.reshape(1, kv_heads, heads // kv_heads, dim), keys, values,
                                                 scale=self._scaling)
        else:
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                                 is_causal=mask is None, scale=self._scaling,
                                                 enable_gqa=heads != kv_heads)[0].transpose(0, 1)
        return few_rows_linear(out.reshape(n, heads * dim), w.o, w.o_bias, FEW_ROWS_LAYER)

    @staticmethod
    def _mlp(w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP with its gate and up projections in one product."""
        gate_up = few_rows_linear(x, w.gate_up, w.gate_up_bias, FEW_ROWS_LAYER)
        inner = gate_up.shape[-1] // 2
        return few_rows_linear(w.act(gate_up[:, :inner]) * gate_up[:, inner:], w.down, w.down_bias, FEW_ROWS_LAYER)

    def reset(self, capacity: int | None = None) -> None:
        """Start a new sequence; ``capacity`` pre-sizes the cache so decoding never reallocates."""
        self.cache.reset()
        if capacity is not None:
            self.cache.reserve(capacity)
            self._ensure_rope(capacity)

