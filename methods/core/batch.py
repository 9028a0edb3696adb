"""Many sequences at once: the batched target pass and the continuous-batching decode loop.

A server keeps many requests in flight, and whether speculation still pays there is the
question the batch-1 numbers cannot answer. ``serve`` runs a method's decoder over a
stream of requests with at most ``concurrency`` of them decoding together:

* each request holds a *slot*: a one-sequence view of one batched KV cache
  (``KVCache.batched`` / ``SlotCache``) and a fork of the method's decoder (``Decoder.fork``),
  so the method's own hooks (prefill, ``draft``, ``update``, its drafter's passes) run on the
  slot exactly as they run alone;
* every step, each slot drafts, and one target pass (``BatchEngine.forward``) verifies all
  the slots' drafts together: the products run over the slots' real tokens packed one after
  another, the attention over the drafts padded to the step's largest, each slot with its
  own positions and tree mask over its own cached length, and padding masked away;
* each slot accepts its own number of tokens; their KV is kept in one gather over the
  batch (``BatchEngine.keep``);
* a finished request leaves its slot and the next waiting one is prefilled into it, so the
  batch stays full while requests wait (continuous batching).

The per-layer work is the engine's own (``Engine``'s weights, norms, RoPE tables and
products), so a method's speedup at a concurrency level is measured against vanilla on the
same code. A request's prefill runs on its slot alone, between batched steps.
"""

from __future__ import annotations

import resource
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from methods.core.decoder import Decoder, Draft, GenConfig, Generation
from methods.core.engine import (FEW_ROWS_LAYER, Engine, ForwardOutput, Injection, _rotate_half, few_rows_linear,
                                 with_attention_backends)
from methods.core.fitting import guard_delta
from methods.core.kv_cache import KVCache
from methods.core.verify import Acceptance


class BatchEngine:
    """The target model over ``slots`` sequences: one batched cache, one engine view per slot."""

    def __init__(self, engine: Engine, slots: int, capacity: int) -> None:
        self.engine = engine
        engine._ensure_rope(capacity + 1)  # the forks share one table, long enough for every slot
        self.cache = KVCache.batched(engine.cache, slots, capacity)
        self.slots = [engine.fork(self.cache.view(b)) for b in range(slots)]
        self._causal = torch.ones((1, 1), dtype=torch.bool, device=engine.device)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # -- the batched pass ---------------------------------------------------------------------
    def _tril(self, n: int) -> torch.Tensor:
        if self._causal.shape[0] < n:
            self._causal = torch.ones((n, n), dtype=torch.bool, device=self.engine.device).tril_()
        return self._causal[:n, :n]

    def _mask(self, vis: torch.Tensor, past: torch.Tensor, pos: torch.Tensor, keys: int,
              window: int | None) -> torch.Tensor:
        """The additive mask [B, 1, N, keys]: a row sees its slot's cached context (below the slot's
        length) and, among the step's tokens, what its layout lets it see; never another slot's
        padding. With a sliding window, keys ``window`` or more positions behind are hidden."""
        e = self.engine
        batch, n = vis.shape[:2]
        j = torch.arange(keys, device=e.device)
        context = j[None, :] < past[:, None]                         # [B, K]
        rel = j[None, :] - past[:, None]
        in_step = (rel >= 0) & (rel < n)
        rel = rel.clamp(0, n - 1)
        step = vis.gather(2, rel[:, None, :].expand(batch, n, keys)) & in_step[:, None, :]
        visible = context[:, None, :] | step                         # [B, N, K]
        if window is not None:
            key_pos = torch.where(context, j[None, :], pos.gather(1, rel))
            visible &= (pos[:, :, None] - key_pos[:, None, :]) < window
        zero = torch.zeros((), dtype=e.dtype, device=e.device)
        return torch.where(visible, zero, torch.tensor(e.neg_inf, dtype=e.dtype, device=e.device))[:, None]

    @torch.no_grad()
    @with_attention_backends
    def forward(self, slots: Sequence[int], drafts: Sequence[Draft]) -> list[ForwardOutput]:
        """One target pass over every listed slot's draft; each slot's output as its engine would give it
        (rows in the slot's own order: its layout's nodes, then its ephemeral tokens)."""
        e = self.engine
        device, batch = e.device, len(slots)
        caches = [self.slots[s].cache for s in slots]
        past_list = [c.length for c in caches]
        counts = [d.layout.n for d in drafts]
        n = max(counts)
        past = torch.tensor(past_list, device=device)
        slot_idx = torch.tensor(slots, device=device)
        if n == 1:
            tokens = torch.cat([d.tokens.view(1) for d in drafts]).view(batch, 1)
        else:
            tokens = torch.nn.utils.rnn.pad_sequence([d.tokens for d in drafts], batch_first=True)
        pos = past[:, None] + torch.arange(n, device=device)[None, :]
        vis = self._tril(n).expand(batch, n, n)
        custom = [i for i, d in enumerate(drafts) if d.layout.positions is not None or d.layout.bias is not None]
        if custom:  # tree layouts: their own positions and visibility; padding rows stay causal
            vis = vis.clone()
            for i in custom:
                layout, k = drafts[i].layout, counts[i]
                if layout.positions is not None:
                    pos[i, :k] = layout.positions + past_list[i]
                if layout.bias is not None:
                    vis[i, :k, :k] = layout.bias == 0
        current = list(counts)
        by_layer: dict[int, list[tuple[int, Injection]]] = {}
        for i, d in enumerate(drafts):
            for inj in d.injections:
                by_layer.setdefault(inj.layer, []).append((i, inj))
        lo, hi = min(slots), max(slots) + 1
        contiguous = hi - lo == batch and list(slots) == list(range(lo, hi))

        h = e.embed_tokens(tokens)
        keys = max(past_list) + n
        masks: dict[int | None, torch.Tensor] = {}
        write = (slot_idx[:, None].expand(batch, n), past[:, None] + torch.arange(n, device=device))
        real, starts = self._packing(current, n)
        x, rope, write = self._packed(h, real, e._rope(pos), write)
        for li, weights in enumerate(e._weights):
            if li in by_layer:
                h = self._unpacked(x, real, batch, n)
                h, pos, vis, n = self._inject(h, pos, vis, current, past, by_layer[li])
                keys = max(past_list) + n
                masks.clear()
                write = (slot_idx[:, None].expand(batch, n), past[:, None] + torch.arange(n, device=device))
                real, starts = self._packing(current, n)
                x, rope, write = self._packed(h, real, e._rope(pos), write)
            window = e._windows[li]
            if window not in masks:
                masks[window] = self._mask(vis, past, pos, keys, window)
            x = x + self._attention(li, weights, weights.attn_norm(x), rope, masks[window], write, keys,
                                    (lo, hi) if contiguous else slot_idx, batch, n, real)
            x = x + e._mlp(weights, weights.mlp_norm(x))
        hidden = e._final_norm(x)
        want = [current[i] if d.all_logits else counts[i] for i, d in enumerate(drafts)]
        if want == current:
            picked = hidden
        else:
            rows = torch.cat([torch.arange(w, device=device) + starts[i] for i, w in enumerate(want)])
            picked = hidden.index_select(0, rows)
        logits = e.lm_head(picked).float()
        return [ForwardOutput(logits=part, hidden=hidden[starts[i]:starts[i] + current[i]])
                for i, part in enumerate(logits.split(want))]

    def _packing(self, current: Sequence[int], n: int) -> tuple[torch.Tensor | None, list[int]]:
        """The padded rows [B x n] that hold real tokens (None: every row does) and where each
        slot's rows start among the packed ones. Why pack: the products are most of a pass,
        and over the real rows alone a slot that drafts nothing costs no padding; only the
        attention sees the padded [B, n] layout."""
        starts, total = [], 0
        for c in current:
            starts.append(total)
            total += c
        if total == len(current) * n:
            return None, starts
        device = self.engine.device
        real = torch.cat([torch.arange(c, device=device) + i * n for i, c in enumerate(current)])
        return real, starts

    @staticmethod
    def _packed(h: torch.Tensor, real: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                write: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The hidden states, RoPE tables and cache write places of the real rows, in packed order."""
        flat = h.reshape(-1, h.shape[-1])
        cos, sin = (t.reshape(-1, t.shape[-1]) for t in rope)
        w0, w1 = write[0].reshape(-1), write[1].reshape(-1)
        if real is None:
            return flat, (cos, sin), (w0, w1)
        return flat.index_select(0, real), (cos[real], sin[real]), (w0[real], w1[real])

    @staticmethod
    def _unpacked(x: torch.Tensor, real: torch.Tensor | None, batch: int, n: int) -> torch.Tensor:
        """Packed rows back in the padded [B, n, hidden] layout (padding rows zero)."""
        if real is None:
            return x.view(batch, n, -1)
        h = x.new_zeros(batch * n, x.shape[-1])
        h.index_copy_(0, real, x)
        return h.view(batch, n, -1)

    def _inject(self, h: torch.Tensor, pos: torch.Tensor, vis: torch.Tensor, current: list[int],
                past: torch.Tensor, injections: list[tuple[int, Injection]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Ephemeral tokens (FIRP's pseudo chains) join their slots at this layer: each slot's
        ``make`` sees that slot's tokens alone, as in a one-sequence pass; the step widens to
        the largest slot, the new rows seeing what ``make`` says and no real row seeing them."""
        made = [(i, *inj.make(h[i:i + 1, :current[i]])) for i, inj in injections]
        batch, n = h.shape[:2]
        wide = max([n] + [current[i] + extra.shape[1] for i, extra, _, _ in made])
        if wide > n:
            grow = wide - n
            device = h.device
            h = torch.cat([h, h.new_zeros(batch, grow, h.shape[2])], dim=1)
            pos = torch.cat([pos, past[:, None] + torch.arange(n, wide, device=device)[None, :]], dim=1)
            tail = self._tril(wide)[None, n:].expand(batch, grow, wide)
            vis = torch.cat([torch.cat([vis, vis.new_zeros(batch, n, grow)], dim=2), tail], dim=1)
        else:
            h, pos, vis = h.clone(), pos.clone(), vis.clone()
        for i, extra, extra_pos, visible in made:
            start, m = current[i], extra.shape[1]
            h[i, start:start + m] = extra[0].to(h.dtype)
            pos[i, start:start + m] = extra_pos.to(pos.device)
            vis[i, start:start + m] = False
            vis[i, start:start + m, :start + m] = visible.to(vis.device)
            current[i] = start + m
        return h, pos, vis, wide

    def _attention(self, li: int, w: Any, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   mask: torch.Tensor, write: tuple[torch.Tensor, torch.Tensor], keys: int,
                   slots: tuple[int, int] | torch.Tensor, batch: int, n: int,
                   real: torch.Tensor | None) -> torch.Tensor:
        """The engine's attention for every slot at once over the packed rows ``x``: the new keys and
        values written at each row's own slot and position, one SDPA call over the slots' caches
        with the step's mask (queries padded to [B, n]; padding rows are computed and dropped)."""
        e = self.engine
        heads, kv_heads, dim = e._heads, e._kv_heads, e._head_dim
        qkv = few_rows_linear(x, w.qkv, w.qkv_bias, FEW_ROWS_LAYER)
        rows = qkv.shape[0]
        qk = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
        cos, sin = rope
        qk = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]
        key_buf, value_buf = self.cache.keys[li], self.cache.values[li]   # [slots, kv_heads, T, dim]
        key_buf[write[0], :, write[1]] = qk[:, heads:]
        value_buf[write[0], :, write[1]] = qkv[:, (heads + kv_heads) * dim:].view(rows, kv_heads, dim)
        if isinstance(slots, tuple):
            k, v = key_buf[slots[0]:slots[1], :, :keys], value_buf[slots[0]:slots[1], :, :keys]
        else:
            k, v = key_buf[slots, :, :keys], value_buf[slots, :, :keys]
        q = qk[:, :heads]
        if real is not None:
            q = q.new_zeros(batch * n, heads, dim).index_copy_(0, real, q)
        # the query heads grouped by their key head: [B, kv_heads, group x n, dim] against the keys as they
        # are, which CPU kernels run several times faster than the repeated-key form (same values)
        group = heads // kv_heads
        if n == 1:
            q = q.reshape(batch, kv_heads, group, dim)
        else:
            q = q.view(batch, n, heads, dim).transpose(1, 2).reshape(batch, kv_heads, group * n, dim)
            mask = mask.repeat(1, 1, group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=e._scaling)
        out = out.reshape(batch, heads, n, dim).transpose(1, 2).reshape(batch * n, heads * dim)
        if real is not None:
            out = out.index_select(0, real)
        return few_rows_linear(out, w.o, w.o_bias, FEW_ROWS_LAYER)

    def keep(self, slots: Sequence[int], accepted: Sequence[Acceptance]) -> None:
        """Each slot keeps its accepted nodes' KV: a leading run in place, every other slot's
        nodes moved to the front of its step in one gather over all layers and slots."""
        moves = []
        for s, acc in zip(slots, accepted):
            if acc.nodes != list(range(len(acc.nodes))):
                moves.append((s, acc))
        if moves:
            device = self.engine.device
            width = max(len(acc.nodes) for _, acc in moves)
            src, dst, rows = [], [], []
            for s, acc in moves:
                base, k = self.slots[s].cache.length, len(acc.nodes)
                nodes = acc.nodes_t.to(device).long()
                if k < width:  # padded with the last node, written to the last place again
                    nodes = torch.cat([nodes, nodes[-1:].expand(width - k)])
                order = torch.arange(width, device=device).clamp(max=k - 1)
                src.append(nodes + base)
                dst.append(order + base)
                rows.append(s)
            bi = torch.tensor(rows, device=device)[:, None].expand(len(rows), width)
            src_t, dst_t = torch.stack(src), torch.stack(dst)
            for buf in (self.cache.keys, self.cache.values):
                buf[:, bi, :, dst_t] = buf[:, bi, :, src_t]
        for s, acc in zip(slots, accepted):
            self.slots[s].cache.length += len(acc.nodes)


@dataclass
class Request:
    """One request of a load run: its prompt, what to generate, and when it arrives: seconds after
    the run starts (an open loop), or None for a closed loop, where the client sends the next
    request as soon as a slot is free (it arrives when it is admitted)."""

    prompt_ids: Sequence[int]
    config: GenConfig
    arrival: float | None = None


@dataclass
class Served:
    """One request's generation and its times, in seconds after the run started: arrival, when it
    took a slot, when its first token was out (after its prefill) and when it finished."""

    generation: Generation
    arrival: float
    admitted: float
    first_token: float
    finished: float

    @property
    def time_to_first_token(self) -> float:
        return self.first_token - self.arrival

    @property
    def latency(self) -> float:
        return self.finished - self.arrival

    @property
    def time_per_output_token(self) -> float:
        """The decode phase's seconds per token after the first (0 for a one-token answer)."""
        later = len(self.generation.tokens) - 1
        return (self.finished - self.first_token) / later if later > 0 else 0.0


@dataclass
class LoadRun:
    """A load run's requests (in the order given) and its batched steps."""

    served: list[Served]
    wall_time: float
    concurrency: int
    batch_sizes: list[int] = field(default_factory=list)    # sequences in each batched pass
    step_tokens: list[int] = field(default_factory=list)    # tokens each pass processed, all slots
    step_accepted: list[int] = field(default_factory=list)  # tokens each pass committed, all slots
    step_times: list[float] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    decoder: Decoder | None = None  # the decoder that ran: fitted to this concurrency where ``adapt``
    forks: list[Decoder] = field(default_factory=list)  # each slot's decoder, as the run left it
    guard: dict[str, int] | None = None  # the rate guard's decisions in this run (its slots share one guard)

    @property
    def output_tokens(self) -> int:
        return sum(len(s.generation.tokens) for s in self.served)

    @property
    def throughput(self) -> float:
        """Output tokens per second over the whole run, prefills and waits included."""
        return self.output_tokens / self.wall_time if self.wall_time > 0 else 0.0


@dataclass
class _Live:
    """A request decoding in a slot."""

    index: int
    generation: Generation
    root: int
    root_t: torch.Tensor
    config: GenConfig
    stop: frozenset[int]
    generator: torch.Generator | None
    arrival: float
    admitted: float
    first_token: float


def capacity_for(decoder: Decoder, requests: Sequence[Request]) -> int:
    """Positions a slot needs for the longest request: prompt, answer, and one step's scratch."""
    return max(len(r.prompt_ids) + r.config.max_new_tokens for r in requests) + 2 * decoder.step_capacity() + 8


def serve(decoder: Decoder, requests: Sequence[Request], concurrency: int, *, adapt: bool = True,
          clock: Callable[[], float] = time.perf_counter, slots_from: LoadRun | None = None) -> LoadRun:
    """Decode ``requests`` with at most ``concurrency`` in flight (continuous batching).

    Requests take slots in order of arrival; a free slot takes the next request that has
    arrived, and when none is decoding the loop waits for the next arrival. Every request's
    token ids are those ``decoder.generate`` gives it alone (greedy; sampled with the same
    seed), up to the numerics of a batched product. With ``adapt`` the method's drafting is
    fitted to passes over ``concurrency`` sequences first (``Decoder.under_load``); the
    decoder that ran is ``LoadRun.decoder``. ``slots_from``, an earlier run of the same decoder
    at the same concurrency, continues its slots' decoders (what each learned across its
    requests: a cost policy's pauses, running rates), as a server's slots outlive one stretch
    of requests; ``adapt`` is then ignored."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if not requests:
        return LoadRun([], 0.0, concurrency)
    engine = decoder.engine
    carried = slots_from.forks if slots_from is not None and len(slots_from.forks) == concurrency else None
    if carried is not None:
        decoder = slots_from.decoder or decoder  # type: ignore[union-attr]
    elif adapt:
        decoder = decoder.under_load(concurrency)
    batch = BatchEngine(engine, concurrency, capacity_for(decoder, requests))
    forks = [(carried[i] if carried else decoder).fork(slot) for i, slot in enumerate(batch.slots)]
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    waiting = deque(sorted(range(len(requests)), key=lambda i: (requests[i].arrival or 0.0, i)))
    live: dict[int, _Live] = {}
    free = list(range(concurrency))
    served: list[Served | None] = [None] * len(requests)
    run = LoadRun([], 0.0, concurrency, decoder=decoder, forks=forks)
    guard_before = decoder.guard_counts()
    start = clock()

    def finish(slot: int, state: _Live, done: bool, now: float) -> None:
        state.generation.stopped_by = "eos" if done else "length"
        served[state.index] = Served(state.generation, state.arrival, state.admitted, state.first_token, now)
        del live[slot]
        free.append(slot)
        free.sort()

    while waiting or live:
        now = clock() - start
        while free and waiting and (requests[waiting[0]].arrival or 0.0) <= now:
            index = waiting.popleft()
            slot = free.pop(0)
            request, fork = requests[index], forks[slot]
            config = request.config
            generator = None
            if not config.greedy:
                generator = torch.Generator(device=engine.device)
                generator.manual_seed(config.seed)
            fork.reserve(len(request.prompt_ids), config.max_new_tokens)
            admitted = clock() - start
            with record_function("serve.prefill"):
                gen, root_t = fork.start(request.prompt_ids, config, generator)
            first = clock() - start
            gen.step_times, gen.draft_times, gen.verify_times = [first - admitted], [0.0], [0.0]
            arrival = admitted if request.arrival is None else request.arrival
            state = _Live(index, gen, gen.tokens[0], root_t, config, frozenset(config.stop_ids), generator,
                          arrival, admitted, first)
            live[slot] = state
            if gen.tokens[0] in state.stop or config.max_new_tokens <= 1:
                finish(slot, state, gen.tokens[0] in state.stop, first)
            now = clock() - start
        if not live:
            if waiting:
                time.sleep(max(0.0, (requests[waiting[0]].arrival or 0.0) - (clock() - start)))
            continue
        slots = sorted(live)
        states = [live[s] for s in slots]
        t0 = clock()
        with record_function("serve.draft"):
            drafts = [forks[s].draft(st.root, st.root_t, st.config.max_new_tokens - len(st.generation.tokens) - 1)
                      for s, st in zip(slots, states)]
        t1 = clock()
        with record_function("serve.forward"):
            outs = batch.forward(slots, drafts)
        with record_function("serve.accept"):
            accepted = _accept_all(forks, slots, states, drafts, outs)
        with record_function("serve.keep"):
            batch.keep(slots, accepted)
        with record_function("serve.update"):
            for s, draft, out, acc in zip(slots, drafts, outs, accepted):
                forks[s].update(draft, out, acc)
        t2 = clock()
        run.batch_sizes.append(len(slots))
        run.step_tokens.append(sum(d.layout.n + d.ephemeral for d in drafts))
        run.step_times.append(t2 - t0)
        committed = 0
        for s, st, draft, acc in zip(slots, states, drafts, accepted):
            gen = st.generation
            before = len(gen.tokens)
            done = Decoder.record_step(gen, draft, acc, st.stop, st.config.max_new_tokens)
            committed += len(gen.tokens) - before
            gen.step_times.append(t2 - t0)
            gen.draft_times.append(t1 - t0)
            gen.verify_times.append(t2 - t1)
            st.root, st.root_t = gen.tokens[-1], acc.bonus_t
            if done or len(gen.tokens) >= st.config.max_new_tokens:
                finish(s, st, done, t2 - start)
        run.step_accepted.append(committed)
    run.wall_time = clock() - start
    run.served = [s for s in served if s is not None]
    run.memory = _memory(engine, batch)
    run.guard = guard_delta(guard_before, decoder.guard_counts())
    return run


def _accept_all(forks: Sequence[Decoder], slots: Sequence[int], states: Sequence[_Live],
                drafts: Sequence[Draft], outs: Sequence[ForwardOutput]) -> list[Acceptance]:
    """Every slot's acceptance. Greedy plain steps (the baseline's, or a method's while drafting
    does not pay) read all their tokens in one host transfer; any other slot is verified as
    it is alone."""
    plain = [i for i, (st, d) in enumerate(zip(states, drafts))
             if st.config.greedy and d.layout.n == 1 and d.host_rows is None]
    result: list[Acceptance | None] = [None] * len(slots)
    if plain:
        greedy = torch.stack([outs[i].logits[0] for i in plain]).argmax(dim=-1)
        root = greedy.new_zeros(1)
        for i, (token, t) in zip(plain, zip(greedy.tolist(), greedy.split(1))):
            result[i] = Acceptance([0], [int(token)], root, t)
    for i, (s, st, d, out) in enumerate(zip(slots, states, drafts, outs)):
        if result[i] is None:
            logits = out.logits[: d.layout.n] if d.all_logits else out.logits
            result[i] = forks[s].accept(d, logits, st.config, st.generator)
    return result  # type: ignore[return-value]


def _memory(engine: Engine, batch: BatchEngine) -> dict[str, int]:
    """What the run held: the batched KV cache's bytes, and the peak of the device's allocator (a
    GPU) or of the process's resident memory (a CPU)."""
    cache = batch.cache
    memory = {"kv_cache_bytes": 2 * cache.keys.numel() * cache.keys.element_size()}
    if engine.device.type == "cuda":
        memory["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(engine.device))
    else:
        memory["peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return memory
