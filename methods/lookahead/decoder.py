"""Lookahead decoding (Fu et al. 2024): Jacobi iteration in a 2D window plus an n-gram pool.

Every step feeds, in **one** forward pass with one combined mask:

* the root (the last accepted token, not yet in the cache);
* the *lookahead branch*: a window of W columns x (N-1) levels of guesses. Token (l, j)
  sits at position root+1+j+l and attends to the root, level 0's columns 0..j, and its own
  column's earlier levels: a Jacobi iteration on W overlapping trajectories;
* the *verification branch*: up to G cached n-grams that start with the root, each a
  chain of N-1 tokens attending to the root and its own prefix.

The lookahead outputs harvest new n-grams (each column's levels plus its new prediction)
into the pool; the verification branch accepts the longest matching guess (greedy, so
lossless). Draft size counts the guess tokens verified; the window tokens count as processed.

That is ``init=ours`` (the default). ``init=upstream`` runs hao-ai-lab/LookaheadDecoding's
defaults instead: level 0 holds the root in its first column (``upstream_visibility``: W x
(N-1) nodes with the root, where ours feeds the root beside W x (N-1)), the window starts as
W+N-3 random prompt tokens (seeded per prompt), a fill phase of N-2 steps builds the levels
(each step's outputs become a new level, every level losing a column) before any guess is
verified, and the pool starts empty. The fill runs in decode steps: upstream's first fill
step rides on its prefill, here the prefill is the one every method shares.

Defaults are smaller than upstream's (LEVEL=5, WINDOW=7, GUESS=7) because on a CPU every
extra token costs time: W=5, N=4, G=5 feeds 15 + 15 = 30 extra tokens. What pays depends
on the hardware's verify-cost curve. ``python -m harness tune lookahead`` decodes training
prompts under many shapes and keeps, for each, the tokens it accepted and the pass sizes
it fed: under greedy decoding these do not depend on the machine, only their cost does. So
``tuned=auto`` (the default) prices every shape of the table shipped for the model and
dtype in ``tuned/`` on this machine's measured curve and runs the best one, or takes plain
steps where no shape is predicted to beat vanilla. ``tuned=none`` runs the ``window``,
``ngram`` and ``guesses`` given, drafting every step.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from methods.core.decoder import Decoder, Draft
from methods.core.engine import ForwardOutput
from methods.core.errors import UserError
from methods.core.fitting import RateGuard, fitted
from methods.core.options import option
from methods.core.tree import TreeLayout, chain_layout
from methods.core.verify import Acceptance


def _guess_chains(vis: torch.Tensor, off: torch.Tensor, base: int, guesses: int, g_len: int) -> None:
    """The verification branch of both window layouts: ``guesses`` chains of ``g_len`` tokens from
    node ``base`` on, each a causal chain after the root."""
    for g in range(guesses):
        for k in range(g_len):
            i = base + g * g_len + k
            off[i] = 1 + k
            vis[i, base + g * g_len: i + 1] = True


def lookahead_visibility(window: int, levels: int, guesses: int, ngram: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible [n, n] bool, position offsets [n]) for root + levels x window + guesses x (ngram-1)."""
    g_len = ngram - 1
    n = 1 + levels * window + guesses * g_len
    vis = torch.zeros((n, n), dtype=torch.bool)
    off = torch.zeros(n, dtype=torch.long)
    vis[:, 0] = True

    def la(level: int, col: int) -> int:
        return 1 + level * window + col

    for level in range(levels):
        for col in range(window):
            i = la(level, col)
            off[i] = 1 + col + level
            vis[i, [la(0, c) for c in range(col + 1)]] = True
            vis[i, [la(lv, col) for lv in range(level + 1)]] = True
    base = 1 + levels * window
    _guess_chains(vis, off, base, guesses, g_len)
    return vis, off


def upstream_visibility(columns: int, levels: int, guesses: int, ngram: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible [n, n] bool, position offsets [n]) for upstream's window, n = levels x columns + guesses x (ngram-1).

    Upstream's level 0 holds the root itself in column 0 (``past_tokens[0]`` is one token short
    of the other levels), so node ``level * columns + col`` is the window token (level, col) and
    node 0 the root: it sits at position root + col + level and attends to level 0's columns
    0..col (a causal chain from the root) and its own column's levels 1..level, as upstream's
    ``j_make_causal_mask_multilevel`` builds it. The guesses are chains from the root, as ours.
    """
    g_len = ngram - 1
    n = levels * columns + guesses * g_len
    vis = torch.zeros((n, n), dtype=torch.bool)
    off = torch.zeros(n, dtype=torch.long)
    for level in range(levels):
        for col in range(columns):
            i = level * columns + col
            off[i] = level + col
            vis[i, :col + 1] = True
            vis[i, [lv * columns + col for lv in range(1, level + 1)]] = True
    base = levels * columns
    vis[base:, 0] = True
    _guess_chains(vis, off, base, guesses, g_len)
    return vis, off


def window_seed(prompt: Sequence[int]) -> int:
    """A per-prompt seed for upstream's random window: the same prompt draws the same window on
    every run and in every round, so counters and token ids are reproducible."""
    return zlib.crc32(",".join(map(str, prompt)).encode())


@dataclass(frozen=True)
class LookaheadOptions:
    window: int = option(5, min=1, max=64, help="Jacobi window width W")
    ngram: int = option(4, min=2, max=16, help="n-gram size N (levels = N - 1)")
    guesses: int = option(5, min=0, max=64, help="cached n-grams verified per step G")
    seed_from_prompt: bool | None = option(None, help="fill the n-gram pool from the prompt first "
                                                      "(default: true with init=ours, false with init=upstream)")
    tuned: str = option("auto", help="auto: the shape of the highest predicted speedup on this machine's measured "
                                     "cost among those `harness tune lookahead` recorded for this model and dtype "
                                     "(methods/lookahead/tuned/), or plain steps where none beats vanilla (with "
                                     "init=upstream: the three options as given); none: the three options as given, "
                                     "drafting every step; or a tune result JSON file")
    init: str = option("ours", choices=("ours", "upstream"),
                       help="ours: the window from prompt tokens at a stride, guesses from the first step; upstream: "
                            "hao-ai-lab/LookaheadDecoding's random prompt tokens (seeded per prompt), a fill phase "
                            "before guesses are used, its window geometry (the root as level 0's first column), "
                            "an empty pool by default; needs ngram >= 3")

    def __post_init__(self) -> None:
        # left unset, the pool follows the initialisation: upstream's starts empty (POOL_FROM_PROMPT=0)
        if self.seed_from_prompt is None:
            object.__setattr__(self, "seed_from_prompt", self.init != "upstream")

    def validate(self) -> None:
        if self.init == "upstream":
            if self.ngram < 3:
                raise ValueError(f"init=upstream needs ngram >= 3 (upstream's LEVEL: level 0 and at least one "
                                 f"Jacobi level), got ngram={self.ngram}")
            if self.tuned not in ("auto", "none"):
                raise ValueError("init=upstream takes no tuned file (its counts were measured with init=ours); "
                                 "set window, ngram and guesses instead")


TUNED_DIR = Path(__file__).parent / "tuned"
SHAPE_KEYS = ("window", "ngram", "guesses")


def tuned_path(model_name: str, device: torch.device, dtype: torch.dtype) -> Path:
    """An older tune result: one shape, fitted to one kind of device's cost curve."""
    return TUNED_DIR / f"{model_name}-{device.type}-{str(dtype).replace('torch.', '')}.json"


def table_path(model_name: str, dtype: torch.dtype) -> Path:
    """A tune result with every shape's counts: one file serves every machine in that dtype."""
    return TUNED_DIR / f"{model_name}-{str(dtype).replace('torch.', '')}.json"


def find_tuned(model_name: str, device: torch.device, dtype: torch.dtype) -> Path | None:
    """What ``tuned=auto`` reads: the model's table for the dtype, else an older per-device result."""
    for path in (table_path(model_name, dtype), tuned_path(model_name, device, dtype)):
        if path.is_file():
            return path
    return None


def read_tune(path: Path) -> dict[str, Any]:
    """A tune result's JSON, with its (W, N, G) checked; a file that is not one says what it lacks."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        shape = tuple(int(data[k]) for k in SHAPE_KEYS)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read lookahead.tuned {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"lookahead.tuned {path} is not a tune result: expected JSON with integer "
                        f"{', '.join(SHAPE_KEYS)} (python -m harness tune lookahead writes one)") from None
    W, N, G = shape
    if W < 1 or N < 2 or G < 0:
        raise UserError(f"lookahead.tuned {path}: window >= 1, ngram >= 2 and guesses >= 0 needed, got {shape}")
    return data


def load_shape(path: Path) -> tuple[int, int, int]:
    """(W, N, G) a tune result names as its best on the machine that ran it."""
    data = read_tune(path)
    W, N, G = (int(data[k]) for k in SHAPE_KEYS)
    return W, N, G


def candidates_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each shape's decoding counts: a table's ``candidates``, or, from an older result that kept
    only its best shape, that shape with its mean accepted length and pass size."""
    rows = data.get("candidates")
    if rows is None and "mean_accepted_length" in data and "processed_per_step" in data:
        rows = [{k: data[k] for k in (*SHAPE_KEYS, "mean_accepted_length", "processed_per_step")}]
    return [r for r in rows or [] if r.get("window", 0) >= 1 and r.get("ngram", 0) >= 2 and r.get("guesses", -1) >= 0]


def candidate_speedup(row: dict[str, Any], curve: Any) -> float:
    """Tokens per unit of one-token pass time under ``curve``: every counted step charged its own
    pass size, or, for a row with means only, the mean step at the mean pass size."""
    counts = row.get("processed_counts")
    if counts and row.get("tokens"):
        return float(row["tokens"]) / sum(int(c) * curve(1 + int(n)) for n, c in counts.items())
    return float(row["mean_accepted_length"]) / curve(1 + float(row["processed_per_step"]))


def pick_shape(rows: Sequence[dict[str, Any]], curve: Any) -> dict[str, Any]:
    """The shape of the highest predicted speedup on ``curve``; within the curve's noise of it
    (``TIE_TOLERANCE``, as for trees) the one feeding the fewest tokens."""
    from methods.core.cost import TIE_TOLERANCE

    table = [{**{k: int(r[k]) for k in SHAPE_KEYS}, "mean_accepted_length": round(float(r["mean_accepted_length"]), 4),
              "processed_per_step": round(float(r["processed_per_step"]), 3),
              "predicted_speedup": round(candidate_speedup(r, curve), 4)} for r in rows]
    top = max(r["predicted_speedup"] for r in table)
    best = min((r for r in table if r["predicted_speedup"] >= top * (1 - TIE_TOLERANCE)),
               key=lambda r: (r["processed_per_step"], -r["predicted_speedup"]))
    return {"shape": tuple(best[k] for k in SHAPE_KEYS), "predicted_speedup": best["predicted_speedup"],
            "best_predicted_speedup": top, "candidates": sorted(table, key=lambda r: -r["predicted_speedup"]),
            "cost_curve": curve.as_dict() if hasattr(curve, "as_dict") else None}


class LookaheadDecoder(Decoder):
    """Lookahead decoding: Jacobi lookahead branch + n-gram verification branch in one pass."""

    Options = LookaheadOptions

    def setup(self) -> None:
        o = self.options
        self.W, self.N, self.G = o.window, o.ngram, o.guesses
        self.shape_from = "options"
        self.shape_choice: dict[str, Any] | None = None
        self.fitted: dict[str, Any] | None = None
        # upstream's initialisation runs the shape given: the shipped tables were tuned with ours
        path = None if o.tuned == "none" or o.init == "upstream" else (
            find_tuned(self.model_name, self.engine.device, self.engine.dtype) if o.tuned == "auto" else Path(o.tuned))
        if path is not None:
            defaults = {f.name: f.default for f in fields(o) if f.name in SHAPE_KEYS}
            changed = [k for k, v in defaults.items() if getattr(o, k) != v]
            if changed:  # never drop a setting the user typed
                raise UserError(f"lookahead.{changed[0]} conflicts with the tuned shape in {path}; pass "
                                f"lookahead.tuned=none to set window, ngram and guesses by hand")
            data = read_tune(path)
            self.W, self.N, self.G = (int(data[k]) for k in SHAPE_KEYS)
            self.shape_from = str(path.relative_to(TUNED_DIR.parents[2])) if path.is_relative_to(TUNED_DIR) else str(path)
            rows = candidates_of(data)
            if rows:  # priced on this machine's curve
                self._fit(rows)
        self.drafting = self.fitted is None or self.fitted["drafting"]
        self._layouts: dict[tuple[int, int], TreeLayout] = {}
        self._upstream_layouts: dict[tuple[int, int, int], TreeLayout] = {}
        self._window_rows: dict[tuple[int, int], torch.Tensor] = {}

    def _fit(self, rows: list[dict[str, Any]]) -> None:
        from methods.core.cost import cost_curve
        from methods.core.files import cache_root

        choice = pick_shape(rows, cost_curve(self.engine, self.model_name, cache_root()))
        self.W, self.N, self.G = choice["shape"]
        self.shape_choice = choice
        self.fitted = fitted(choice["best_predicted_speedup"], f"W={self.W} N={self.N} G={self.G}",
                             basis="the tuner's accepted tokens and pass sizes per shape and this machine's measured costs")
        # the tuner's prompts overstate other tasks' acceptance as a trainer's split does (MT-bench
        # at batch 2 accepted 1.26 tokens a step against a shape predicted to pay): the shape
        # drafts under a guard that keeps its measured step cost and checks what verification accepts
        if self.fitted["drafting"]:
            row = next(r for r in choice["candidates"] if tuple(r[k] for k in SHAPE_KEYS) == choice["shape"])
            self.guard = RateGuard(row["mean_accepted_length"], row["predicted_speedup"])

    def _layout(self, levels: int, guesses: int) -> TreeLayout:
        """Root, ``levels`` x W window tokens (fed, never drafts), ``guesses`` n-gram chains from the root."""
        key = (levels, guesses)
        if key not in self._layouts:
            W, g_len = self.W, self.N - 1
            vis, off = lookahead_visibility(W, levels, guesses, self.N)
            base = 1 + levels * W
            parents = [-1] + [-2] * (levels * W)
            for g in range(guesses):
                parents += [0] + [base + g * g_len + k for k in range(g_len - 1)]
            self._layouts[key] = TreeLayout(parents, self.engine, max_depth=g_len, visible=vis, positions=off)
        return self._layouts[key]

    def _upstream_layout(self, columns: int, levels: int, guesses: int) -> TreeLayout:
        """Upstream's geometry: the root as level 0's first column, ``levels`` x ``columns`` nodes in all."""
        key = (columns, levels, guesses)
        if key not in self._upstream_layouts:
            g_len = self.N - 1
            vis, off = upstream_visibility(columns, levels, guesses, self.N)
            base = levels * columns
            parents = [-1] + [-2] * (base - 1)
            for g in range(guesses):
                parents += [0] + [base + g * g_len + k for k in range(g_len - 1)]
            self._upstream_layouts[key] = TreeLayout(parents, self.engine, max_depth=g_len, visible=vis,
                                                     positions=off)
        return self._upstream_layouts[key]

    def describe(self) -> dict[str, Any]:
        on = self.drafting
        return {**super().describe(), "shape": f"W={self.W} N={self.N} G={self.G}", "shape_from": self.shape_from,
                "draft_size_max": self.G * (self.N - 1) if on else 0,
                "processed_max": self.step_capacity() - 1 if on else 0,
                **({"fitted": self.fitted, "shape_choice": self.shape_choice} if self.fitted else {})}

    def drafter(self) -> str:
        return "the target's own Jacobi window and an n-gram pool"

    def step_capacity(self) -> int:
        W, N, G = self.W, self.N, self.G
        if self.options.init == "upstream":
            # the fill phase's passes are wider (W + N - 2 columns at first) but carry no guesses
            filling = max(levels * (W + N - 1 - levels) for levels in range(1, N - 1)) if N > 2 else 0
            return max(filling, (N - 1) * W + G * (N - 1))
        return 1 + W * (N - 1) + G * (N - 1)

    def _add(self, pool: dict[int, list[tuple[int, ...]]], gram: tuple[int, ...]) -> None:
        bucket = pool.setdefault(gram[0], [])
        tail = gram[1:]
        if tail in bucket:
            bucket.remove(tail)
        bucket.append(tail)
        if len(bucket) > self.G:
            del bucket[0]

    def begin(self, prompt_ids: Sequence[int], out: ForwardOutput) -> None:
        N, W = self.N, self.W
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self.levels: list[list[int]]
        prompt = list(prompt_ids)
        if self.options.seed_from_prompt:
            for i in range(len(prompt) - N + 1):
                self._add(self.pool, tuple(prompt[i:i + N]))
        if self.options.init == "upstream":
            # upstream's ``copy_from``: random prompt tokens, W + N - 3 of them after the root, so that
            # N - 2 fill steps (each dropping a column) leave W columns; seeded per prompt, where
            # upstream's own seed line is commented out
            rng = random.Random(window_seed(prompt))
            self.levels = [[rng.choice(prompt) for _ in range(W + N - 3)]]
            return
        # level 0 starts as a slice of the prompt (any tokens work; Jacobi iterations fix them up)
        self.levels = [[prompt[(i * 7) % len(prompt)] for i in range(W)]]

    def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
        if not self.drafting or self.guard_says_plain():  # the window waits, as it is, for the next drafted step
            return Draft(root_t, chain_layout(0, self.engine))
        if self.options.init == "upstream":
            return self._upstream_draft(root, root_t)
        guesses = self.pool.get(root, [])[-self.G:] if self.G else []
        layout = self._layout(len(self.levels), len(guesses))
        fed = [t for lv in self.levels for t in lv] + [t for g in guesses for t in g]
        tokens = torch.cat([root_t, torch.tensor(fed, dtype=torch.long, device=root_t.device)])
        last = 1 + (len(self.levels) - 1) * self.W
        return Draft(tokens, layout, host_rows=self._rows(last))

    def _upstream_draft(self, root: int, root_t: torch.Tensor) -> Draft:
        """Root, level 0's other columns, the Jacobi levels; guesses only once all N - 1 levels exist."""
        levels = len(self.levels)
        columns = len(self.levels[0]) + 1
        full = levels == self.N - 1
        guesses = self.pool.get(root, [])[-self.G:] if full and self.G else []
        layout = self._upstream_layout(columns, levels, len(guesses))
        fed = [t for lv in self.levels for t in lv] + [t for g in guesses for t in g]
        tokens = torch.cat([root_t, torch.tensor(fed, dtype=torch.long, device=root_t.device)])
        return Draft(tokens, layout, host_rows=self._rows((levels - 1) * columns, columns), state=root)

    def _rows(self, start: int, width: int | None = None) -> torch.Tensor:
        """The window's last level, whose greedy outputs come back with the acceptance (no extra sync)."""
        width = self.W if width is None else width
        if (start, width) not in self._window_rows:
            self._window_rows[start, width] = torch.arange(start, start + width, device=self.engine.device)
        return self._window_rows[start, width]

    def _upstream_update(self, root: int, last: list[int]) -> None:
        """Fill phase: every level drops its first column (now behind the root) and the last level's
        outputs past its first column become a new level. Full: harvest each column's n-gram (level
        0's token, the root in column 0, then the levels and the new output), shift one level."""
        levels = self.levels
        if len(levels) < self.N - 1:
            self.levels = [lv[1:] for lv in levels] + [last[1:]]
            return
        for c in range(self.W):
            head = root if c == 0 else levels[0][c - 1]
            self._add(self.pool, (head, *(levels[lv][c] for lv in range(1, len(levels))), last[c]))
        self.levels = [levels[1][1:], *levels[2:], list(last)]

    def update(self, draft: Draft, out: ForwardOutput, acc: Acceptance) -> None:
        if not self.drafting or draft.layout.n == 1:  # a plain step fed no window
            return
        self.observe(draft.layout.n, acc.accepted_drafts + 1)
        if self.options.init == "upstream":
            self._upstream_update(draft.state, list(acc.host_rows))
            return
        # lookahead branch: harvest n-grams, then shift the window by one level
        last, n_lv = acc.host_rows, len(self.levels)
        if n_lv == self.N - 1:
            for c in range(self.W):
                self._add(self.pool, tuple([self.levels[lv][c] for lv in range(n_lv)] + [last[c]]))
            self.levels = self.levels[1:] + [last]
        else:
            self.levels = self.levels + [last]
