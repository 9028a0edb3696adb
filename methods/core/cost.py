"""What a verification pass costs on *this* hardware, and the tree that pays off most there.

SPEED-Bench and EAGLE's own harness found that the best draft size depends on the device,
the dtype and the batch: on a CPU with bf16 units a 16-token pass costs about 1.2x one token
in bf16 but about 2x in float32, on a GPU almost nothing. So the harness measures the
curve t(n)/t(1) once per (model, device, dtype, threads), caches it, and a method with a
static tree picks, from its trainer's teacher-forced accepted length of the best tree of
each size, the tree with the highest *expected speedup*:

    predicted speedup(tree) = E[accepted length](tree) / (t(processed(tree)) / t(1))

where ``processed`` counts every token the target pass runs (root, draft nodes, and
FIRP's pseudo tokens). Drafting work outside the pass (Medusa's heads and their LM head,
FIRP's top-k) is measured the same way, in units of a one-token pass, and added to every
candidate's cost; the report puts the prediction beside the measured speedup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
ENGINE_COST_VERSION = 6  # bump when the engine's pass or the measurement changes, so cached curves re-measure
CONTEXT = 256


def monotone(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence (least squares; pool adjacent violators).

    A pass over more tokens never costs less, but a measured curve can dip (32 tokens
    under 24 in one cached bf16 curve), and a dip makes the largest tree before it look
    cheap. Pooling the violators averages the noise out instead of keeping its maxima."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    return [m for m, c in blocks for _ in range(int(c))]


@dataclass(frozen=True)
class CostCurve:
    """t(n)/t(1) at measured sizes, made non-decreasing, linearly interpolated (and
    extrapolated from the last two). ``ratios`` keeps the raw medians for the report."""

    sizes: tuple[int, ...]
    ratios: tuple[float, ...]
    one_token_ms: float = 0.0
    key: str = ""
    load: float | None = None  # share of the cores other processes kept busy while it was measured
    # a batched curve only: T(B; one sequence n, the others 1) / T(B, 1) at ``sizes``, and one
    # sequence's plain pass alone in ms, both timed in the same rounds as the curve
    lone: tuple[float, ...] | None = None
    single_ms: float | None = None

    def __call__(self, n: float) -> float:
        xs, ys = self.sizes, self.smoothed()
        if n <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = (xs[-2], ys[-2]), (xs[-1], ys[-1])
        return y1 + (y1 - y0) * (n - x1) / (x1 - x0)

    def smoothed(self) -> list[float]:
        """Non-decreasing, and never under the one-token pass the ratios are relative to."""
        return monotone([max(self.ratios[0], r) for r in self.ratios])

    def as_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "ratios": [round(r, 4) for r in self.ratios],
                "monotone": [round(r, 4) for r in self.smoothed()],
                "one_token_ms": round(self.one_token_ms, 3), "key": self.key,
                **({"load": round(self.load, 2)} if self.load is not None else {}),
                **({"lone": [round(r, 4) for r in self.lone]} if self.lone is not None else {}),
                **({"single_ms": round(self.single_ms, 3)} if self.single_ms is not None else {})}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any], key: str) -> CostCurve:
        lone = saved.get("lone")
        return cls(tuple(saved["sizes"]), tuple(saved["ratios"]), float(saved.get("one_token_ms", 0.0)), key,
                   saved.get("load"), tuple(lone) if lone is not None else None, saved.get("single_ms"))

    def per_slot(self, batch: int) -> CostCurve:
        """What one sequence's n tokens cost the batch, in units of its own plain step: the
        pass grows from T(B, 1) to T_lone(n) for all B sequences while only this one gains,
        so a draft's cost is 1 + B x (lone(n) - 1). An online policy that drafts for one
        sequence at a time (PLD) prices its drafts with it; a tree every sequence drafts
        alike is priced by the curve itself."""
        if self.lone is None or batch <= 1:
            return self
        return CostCurve(self.sizes, tuple(1.0 + batch * max(0.0, r - 1.0) for r in self.lone), self.one_token_ms,
                         self.key + "|per-slot", self.load)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hardware_key(engine: Any, model_name: str) -> str:
    """What the curve depends on: model, device (its name), dtype and thread count."""
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}")
    return json.dumps({"model": model_name or type(engine.model).__name__, "layers": engine.config.num_hidden_layers,
                       "hidden": engine.config.hidden_size, "device": f"{device.type}:{name}",
                       "dtype": str(engine.dtype), "threads": torch.get_num_threads(),
                       "engine": ENGINE_COST_VERSION}, sort_keys=True)


@torch.no_grad()
def measure(engine: Any, sizes: Sequence[int] = SIZES, context: int = CONTEXT, rounds: int = 9) -> CostCurve:
    """Median time of an n-token tree pass after ``context`` cached tokens, rounds interleaved over sizes."""
    engine.reset(context + max(sizes) + 1)
    vocab = engine.config.vocab_size
    engine.forward([i % vocab for i in range(context)], commit=True, want_logits=False)
    biases = {n: engine.tree_bias(torch.ones(n, n, dtype=torch.bool, device=engine.device).tril()) if n > 1 else None
              for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    with OtherLoad() as load:
        _timed_rounds(engine, sizes, rounds, biases, times)
    return CostCurve(tuple(sizes), tuple(_round_ratios(times, sizes[0], sizes)),
                     statistics.median(times[sizes[0]]) * 1000, load=load.share)


def _round_ratios(times: Mapping[Any, list[float]], base: Any, keys: Sequence[Any]) -> list[float]:
    """Each key's time over ``base``'s in the same round, the median over rounds. Why not the ratio
    of medians: a machine whose speed drifts over seconds moves whole rounds, and a ratio
    within a round cancels that, where medians taken apart can land in different stretches."""
    return [statistics.median(t / b for t, b in zip(times[k], times[base])) for k in keys]


BATCH_TOKENS = 512  # the most tokens one batched measurement pass runs, all sequences together


@torch.no_grad()
def measure_batched(engine: Any, batch: int, sizes: Sequence[int] = SIZES, context: int = CONTEXT,
                    rounds: int = 5) -> CostCurve:
    """``measure`` for a pass over ``batch`` sequences, each verifying n tokens after ``context``
    cached ones: T(batch, n) / T(batch, 1). ``one_token_ms`` is then the batch's plain step.
    In the same rounds: ``lone``, the pass where one sequence verifies n and the others one
    token each (what one sequence's draft costs the batch), and ``single_ms``, one sequence's
    plain pass alone, so the batch's cost per sequence is compared within one stretch of the
    machine's speed."""
    from methods.core.batch import BatchEngine
    from methods.core.decoder import Draft
    from methods.core.tree import chain_layout

    uniform = [n for n in sizes if n * batch <= BATCH_TOKENS] or [1]
    lone_sizes = list(sizes)
    runner = BatchEngine(engine, batch, context + max(max(uniform), max(lone_sizes)) + 1)
    vocab = engine.config.vocab_size
    for slot in runner.slots:
        slot.forward([i % vocab for i in range(context)], commit=True, want_logits=False)

    def chain(n: int) -> Draft:
        return Draft(torch.arange(n, device=engine.device) % vocab, chain_layout(n - 1, engine))

    slots = list(range(batch))
    plain = chain(1)
    passes: dict[Any, Callable[[], Any]] = {("all", n): (lambda d=[chain(n)] * batch: runner.forward(slots, d))
                                            for n in uniform}
    passes.update({("lone", n): (lambda d=[chain(n)] + [plain] * (batch - 1): runner.forward(slots, d))
                   for n in lone_sizes if n > 1})
    passes["single"] = lambda: runner.forward([0], [plain])
    times: dict[Any, list[float]] = {k: [] for k in passes}
    with OtherLoad() as load:
        for r in range(rounds + 1):
            for k, fn in passes.items():
                _sync(engine.device)
                start = time.perf_counter()
                fn()
                _sync(engine.device)
                if r:  # round 0 warms every shape up
                    times[k].append(time.perf_counter() - start)
    base = ("all", uniform[0])
    times[("lone", 1)] = times[base]
    return CostCurve(tuple(uniform), tuple(_round_ratios(times, base, [("all", n) for n in uniform])),
                     statistics.median(times[base]) * 1000, load=load.share,
                     lone=tuple(_round_ratios(times, base, [("lone", n) for n in lone_sizes])),
                     single_ms=statistics.median(times["single"]) * 1000)


def _timed_rounds(engine: Any, sizes: Sequence[int], rounds: int, biases: dict[int, Any],
                  times: dict[int, list[float]]) -> None:
    vocab = engine.config.vocab_size
    for r in range(rounds + 1):
        for n in sizes:
            _sync(engine.device)
            start = time.perf_counter()
            engine.forward([i % vocab for i in range(n)], step_bias=biases[n])
            _sync(engine.device)
            if r:  # round 0 warms every shape up
                times[n].append(time.perf_counter() - start)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has spent busy (Linux), or None where unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class OtherLoad:
    """The share of the machine's cores that *other* processes kept busy over a stretch of
    time: all busy CPU time minus this process's own, over wall time x cores. Unlike the load
    average it does not lag, and this process's own threads do not count."""

    def __enter__(self) -> OtherLoad:
        self.wall, self.own, self.busy = time.perf_counter(), time.process_time(), _busy_cpu_seconds()
        self.share: float | None = None
        return self

    def __exit__(self, *_: object) -> None:
        busy = _busy_cpu_seconds()
        if self.busy is None or busy is None:
            return
        wall = time.perf_counter() - self.wall
        others = (busy - self.busy) - (time.process_time() - self.own)
        self.share = max(0.0, others / max(1e-9, wall * (os.cpu_count() or 1)))


LOADED_SHARE = 0.25


def loaded(curve: CostCurve) -> bool:
    """Measured while other work kept the cores busy: the curve of a busy machine, not of this
    hardware. Caching it would fix every later tree choice to that moment's load (the first
    curve measured beside a training job prices every pass at the busy machine's speed)."""
    return curve.load is not None and curve.load >= LOADED_SHARE


_MEMO: dict[str, CostCurve] = {}
_LOAD: tuple[int, CostCurve, float] | None = None  # (sequences, their curve, drafting-cost scale): ``under_load``
_PINNED: Mapping[str, Any] | None = None   # costs to use instead of measuring (``recording_costs``)
_RECORD: dict[str, Any] | None = None      # what was used, while a run's methods set up


@contextmanager
def recording_costs(pinned: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Within: every cost a method's setup asks for is noted in the yielded record (the curve
    and each named call cost, as ``{"curve": {...}, "calls": {name: value}}``), and taken from
    ``pinned`` (an earlier record) instead of measured where it holds one.

    A run's manifest keeps its record, a baseline copies it, and the CI gate replays it: the
    choices ``auto`` and the cost policies make are then the baseline machine's, whatever CPU
    the gate runs on, so a changed choice is the code's doing, not the hardware's."""
    global _PINNED, _RECORD
    previous = _PINNED, _RECORD
    _PINNED, _RECORD = pinned, {"curve": None, "calls": {}}
    try:
        yield _RECORD
    finally:
        _PINNED, _RECORD = previous


@contextmanager
def under_load(engine: Any, model_name: str, cache_dir: Path | None, batch: int) -> Iterator[None]:
    """Within: every cost a method's setup asks for is that of a step serving ``batch`` sequences.

    The verify curve is T(batch, n) / T(batch, 1), measured once per machine and batch size
    and cached like the one-sequence curve. A method's drafting work (heads, a draft model,
    skipped-layer passes) runs once per sequence while the verify pass is shared, so a call
    cost in units of a one-sequence step is scaled by batch x T(1, 1) / T(batch, 1) (both timed
    in the same rounds): where the batched pass is cheap per sequence, drafting weighs that
    much more. ``slot_cost_curve`` prices one sequence's own draft. At batch 1 this changes
    nothing."""
    global _LOAD
    if batch <= 1:
        yield
        return
    batched = _cost_curve(engine, model_name, cache_dir, batch)
    single = batched.single_ms or _cost_curve(engine, model_name, cache_dir).one_token_ms
    scale = batch * single / batched.one_token_ms if batched.one_token_ms > 0 else float(batch)
    previous = _LOAD
    _LOAD = (batch, batched, scale)
    try:
        yield
    finally:
        _LOAD = previous


def check_cost_record(record: Any, where: str) -> dict[str, Any]:
    """A cost record as ``recording_costs`` writes it, or a ``UserError`` naming ``where``."""
    from methods.core.errors import UserError

    curve = record.get("curve") if isinstance(record, dict) else None
    calls = record.get("calls", {}) if isinstance(record, dict) else None
    if (not isinstance(curve, dict) or not isinstance(calls, dict)
            or not all(isinstance(curve.get(k), list) for k in ("sizes", "ratios"))
            or len(curve["sizes"]) != len(curve["ratios"]) or len(curve["sizes"]) < 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in calls.values())):
        raise UserError(f"{where} holds no cost record (a 'costs' entry with a curve of sizes and ratios, as a "
                        "run's manifest.json or a baseline from `harness baseline` has)")
    return record


def _note_curve(curve: CostCurve) -> CostCurve:
    if _RECORD is not None:
        _RECORD["curve"] = curve.as_dict()
    return curve


def cost_curve(engine: Any, model_name: str, cache_dir: Path | None) -> CostCurve:
    """The measured curve for this engine's hardware, from memory, the cache folder, or a fresh
    measurement; inside ``recording_costs`` with a pinned curve, that one; inside ``under_load``,
    the curve of a pass over that many sequences."""
    if _LOAD is not None:
        return _LOAD[1]  # not noted: the run's record keeps the one-sequence curve
    if _PINNED is not None and _PINNED.get("curve"):
        saved = _PINNED["curve"]
        return _note_curve(CostCurve(tuple(saved["sizes"]), tuple(saved["ratios"]),
                                     float(saved.get("one_token_ms", 0.0)), str(saved.get("key", "pinned")),
                                     saved.get("load")))
    return _note_curve(_cost_curve(engine, model_name, cache_dir))


def slot_cost_curve(engine: Any, model_name: str, cache_dir: Path | None) -> CostCurve:
    """The cost of one sequence's own draft: ``cost_curve`` alone; inside ``under_load``, what that
    draft costs the whole batch per unit of the sequence's plain step (``CostCurve.per_slot``)."""
    if _LOAD is not None:
        return _LOAD[1].per_slot(_LOAD[0])
    return cost_curve(engine, model_name, cache_dir)


def _cost_curve(engine: Any, model_name: str, cache_dir: Path | None, batch: int = 1) -> CostCurve:
    key = hardware_key(engine, model_name) + (f"|batch={batch}" if batch > 1 else "")
    if key in _MEMO:
        return _MEMO[key]
    path = measurement_path(cache_dir, "cost", key)
    stored = read_measurement(path)
    if stored is not None:
        try:
            curve = CostCurve.from_dict(stored, key)
            _MEMO[key] = curve
            return curve
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    curve = measure(engine) if batch == 1 else measure_batched(engine, batch)
    curve = dataclasses.replace(curve, key=key)
    _MEMO[key] = curve
    if loaded(curve):
        print(f"warning: other processes kept {curve.load:.0%} of the cores busy while the verify-cost "
              "curve was measured; using it for this run only, not caching it", file=sys.stderr)
    else:
        store_measurement(path, curve.as_dict())
    return curve


def measurement_path(cache_dir: Path | None, kind: str, key: str) -> Path | None:
    """Where a measurement of this machine is kept between runs: ``cache_dir/<kind>/<hash of key>.json``,
    the key naming everything the figure depends on (machine, model, dtype, threads)."""
    if cache_dir is None:
        return None
    return Path(cache_dir) / kind / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")


def read_measurement(path: Path | None) -> Any:
    """A kept measurement's JSON, or None where there is none or it is unreadable: measured afresh."""
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def store_measurement(path: Path | None, payload: Any) -> None:
    """Keep a measurement, replaced atomically so a concurrent run never reads half a file; an
    unwritable cache only costs a re-measurement next time."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass


PassCost = Callable[[list[list[int]], CostCurve], float]


def layered_cost(curve: CostCurve, num_layers: int, base: int, joins: Sequence[tuple[int, int]]) -> float:
    """A pass in which ``base`` tokens run every layer and ``joins`` = (layer, count) tokens
    enter at an inner layer (FIRP's pseudo tokens): each stretch of layers is charged, by its
    share of the layers, the curve at the tokens present there. Charging every token the
    whole pass overstates what tokens entering at layer 18 of 30 cost."""
    cuts = sorted({0, num_layers, *(min(max(layer, 0), num_layers) for layer, _ in joins)})
    total = 0.0
    for lo, hi in zip(cuts, cuts[1:]):
        present = base + sum(count for layer, count in joins if layer <= lo)
        total += (hi - lo) / num_layers * curve(present)
    return total


TIE_TOLERANCE = 0.03
"""Predicted speedups this close to the best count as ties, and among them the shallowest
tree wins (then the highest prediction): curves measured minutes apart on one machine differ
by a few percent at a size, and the teacher-forced gain of a deep node shrinks most out of
domain, so a deeper tree that wins a near tie on paper tends to lose on the benchmarks
(docs/tree-choice.md has the measurements)."""


def pick_tree(candidates: Sequence[dict[str, Any]], curve: CostCurve,
              processed: Callable[[list[list[int]]], int], draft_overhead: float = 0.0,
              pass_cost: PassCost | None = None) -> dict[str, Any]:
    """The candidate (``{"paths", "expected_accepted_length"}``, as trainers' ``tree_search``
    records them) with the highest predicted speedup, or the shallowest of those within
    ``TIE_TOLERANCE`` of it; returns it with the whole table.
    ``draft_overhead`` is the per-step drafting cost outside the pass, in vanilla steps;
    ``pass_cost`` prices a pass whose tokens do not all run every layer (default: the
    curve at ``processed``)."""
    table = []
    for c in candidates:
        paths = [list(p) for p in c["paths"]]
        n = processed(paths)
        acc = float(c["expected_accepted_length"])
        cost = (pass_cost(paths, curve) if pass_cost is not None else curve(n)) + draft_overhead
        table.append({"draft_size": len(paths), "processed": n, "expected_accepted_length": round(acc, 4),
                      "cost": round(cost, 4), "predicted_speedup": round(acc / cost, 4),
                      **({"name": c["name"]} if "name" in c else {}), "paths": paths})
    top = max(row["predicted_speedup"] for row in table)
    # within the prediction's noise of the best: the shallowest tree, then the fastest predicted
    near = [row for row in table if row["predicted_speedup"] >= top * (1 - TIE_TOLERANCE)]
    best = min(near, key=lambda row: (max(len(p) for p in row["paths"]), -row["predicted_speedup"],
                                      row["processed"]))
    return {"paths": best["paths"], "draft_size": best["draft_size"], "predicted_speedup": best["predicted_speedup"],
            "expected_accepted_length": best["expected_accepted_length"], "processed": best["processed"],
            "candidates": [{k: v for k, v in row.items() if k != "paths"} for row in table],
            "draft_overhead": round(draft_overhead, 4), "tie_tolerance": TIE_TOLERANCE,
            "best_predicted_speedup": top, "cost_curve": curve.as_dict()}


def _median_ratio(engine: Any, variant: Callable[[int], Any], context: int, rounds: int) -> float:
    """Median time of ``variant(round)`` over a plain one-token forward after ``context`` cached
    tokens, the two interleaved round by round so drift in clock or load hits both alike."""
    engine.reset(context + 2)
    vocab = engine.config.vocab_size
    engine.forward([i % vocab for i in range(context)], commit=True, want_logits=False)
    plain, other = [], []
    for r in range(rounds + 1):
        for fn, bucket in ((lambda r: engine.forward([r % vocab]), plain), (variant, other)):
            _sync(engine.device)
            start = time.perf_counter()
            fn(r)
            _sync(engine.device)
            if r:  # round 0 warms both up
                bucket.append(time.perf_counter() - start)
    return statistics.median(other) / statistics.median(plain)


def _named_cost(name: str, measure: Callable[[], float]) -> float:
    """A call cost by ``name``: pinned, or measured; noted in the record either way."""
    pinned = (_PINNED or {}).get("calls", {})
    value = float(pinned[name]) if name in pinned else measure()
    if _RECORD is not None:
        _RECORD["calls"][name] = round(value, 6)
    return value * (_LOAD[2] if _LOAD is not None else 1.0)


@torch.no_grad()
def relative_step_cost(engine: Any, name: str, context: int = 128, rounds: int = 7, **forward_kwargs: Any) -> float:
    """A one-token forward with ``forward_kwargs`` (a skip set) over a plain one: what a
    self-drafting step costs in units of a vanilla step, on this hardware. ``name`` says what
    is measured (and what it depends on), for the run's cost record."""
    vocab = engine.config.vocab_size
    return _named_cost(name, lambda: _median_ratio(
        engine, lambda r: engine.forward([r % vocab], **forward_kwargs), context, rounds))


@torch.no_grad()
def relative_call_cost(engine: Any, fn: Callable[[], Any], name: str, context: int = 128, rounds: int = 7) -> float:
    """``fn()`` (a method's drafting work outside the target pass) in units of a vanilla step.

    The tree prediction adds it to every candidate's pass cost: Medusa's heads run the
    49k-row LM head once per step whatever the tree, which favours larger trees where it is
    dear (float32 on a CPU) and is negligible where it is cheap. ``name`` as above."""
    return _named_cost(name, lambda: _median_ratio(engine, lambda r: fn(), context, rounds))
