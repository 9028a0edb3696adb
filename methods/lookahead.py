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
lossless). Draft size counts every token fed per step beyond the root.

Defaults are smaller than upstream's (LEVEL=5, WINDOW=7, GUESS=7) because on a CPU every
extra token costs time: W=5, N=4, G=5 feeds 15 + 15 = 30 extra tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch

from methods.base import Decoder, Generation, register_method, truncate_at_stop
from methods.engine import Engine


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
    for g in range(guesses):
        for k in range(g_len):
            i = base + g * g_len + k
            off[i] = 1 + k
            vis[i, base + g * g_len: i + 1] = True
    return vis, off


@register_method("lookahead")
class LookaheadDecoder(Decoder):
    """Lookahead decoding: Jacobi lookahead branch + n-gram verification branch in one pass."""

    def __init__(self, engine: Engine, window: int | str = 5, ngram: int | str = 4, guesses: int | str = 5,
                 seed_from_prompt: bool | str = True, model_name: str = "", **options: Any) -> None:
        self.W, self.N, self.G = int(window), int(ngram), int(guesses)
        if self.N < 2 or self.W < 1 or self.G < 0:
            raise ValueError("lookahead needs ngram >= 2, window >= 1, guesses >= 0")
        self.seed_from_prompt = str(seed_from_prompt).lower() not in ("0", "false", "no")
        # Masks depend only on (levels filled, guesses used): built once, sliced per step.
        self._layouts = {}
        for levels in range(1, self.N):
            vis, off = lookahead_visibility(self.W, levels, self.G, self.N)
            self._layouts[levels] = (engine.tree_bias(vis), off.to(engine.device))
        super().__init__(engine, model_name=model_name, window=self.W, ngram=self.N, guesses=self.G,
                         seed_from_prompt=self.seed_from_prompt, **options)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "draft_size_max": self.W * (self.N - 1) + self.G * (self.N - 1)}

    def _add(self, pool: dict[int, list[tuple[int, ...]]], gram: tuple[int, ...]) -> None:
        bucket = pool.setdefault(gram[0], [])
        tail = gram[1:]
        if tail in bucket:
            bucket.remove(tail)
        bucket.append(tail)
        if len(bucket) > self.G:
            del bucket[0]

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop: Collection[int] = ()) -> Generation:
        engine, W, N, G = self.engine, self.W, self.N, self.G
        g_len = N - 1
        engine.reset(capacity=len(prompt_ids) + max_new_tokens + 1 + W * (N - 1) + G * g_len)
        stop = frozenset(stop)
        out = engine.forward(prompt_ids, logits_rows=slice(-1, None), commit=True)
        root = int(out.logits[-1].argmax())
        gen = Generation(tokens=[root], accepted=[1], draft_sizes=[0], draft_times=[0.0], verify_times=[0.0])
        pool: dict[int, list[tuple[int, ...]]] = {}
        prompt = list(prompt_ids)
        if self.seed_from_prompt:
            for i in range(len(prompt) - N + 1):
                self._add(pool, tuple(prompt[i:i + N]))
        # level 0 starts as a slice of the prompt (any tokens work; Jacobi iterations fix them up)
        levels: list[list[int]] = [[prompt[(i * 7) % len(prompt)] for i in range(W)]]
        done = root in stop
        while not done and len(gen.tokens) < max_new_tokens:
            t0 = self._now()
            guesses = pool.get(root, [])[-G:] if G else []
            n_lv = len(levels)
            bias_full, off_full = self._layouts[n_lv]
            n_la = 1 + n_lv * W
            n = n_la + len(guesses) * g_len
            # guesses sit last in the layout, so fewer guesses is just a leading square of it
            bias, offsets = bias_full[:n, :n], off_full[:n]
            tokens = [root] + [t for lv in levels for t in lv] + [t for g in guesses for t in g]
            t1 = self._now()
            past = engine.cache.length
            out = engine.forward(tokens, position_ids=offsets + past, step_bias=bias)
            greedy = out.logits.argmax(dim=-1).tolist()
            # verification branch: the longest guess matching the target's greedy choices
            best, best_len = -1, 0
            for gi, guess in enumerate(guesses):
                start = n_la + gi * g_len
                expected = greedy[0]
                length = 0
                for k in range(g_len):
                    if guess[k] != expected:
                        break
                    length += 1
                    expected = greedy[start + k]
                if length > best_len:
                    best, best_len = gi, length
            if best >= 0 and best_len:
                start = n_la + best * g_len
                engine.cache.keep([0] + list(range(start, start + best_len)))
                new = list(guesses[best][:best_len]) + [greedy[start + best_len - 1]]
            else:
                engine.cache.keep([0])
                new = [greedy[0]]
            # lookahead branch: harvest n-grams, then shift the window by one level
            last = [greedy[1 + (n_lv - 1) * W + c] for c in range(W)]
            if n_lv == N - 1:
                for c in range(W):
                    self._add(pool, tuple([levels[lv][c] for lv in range(n_lv)] + [last[c]]))
                levels = levels[1:] + [last]
            else:
                levels = levels + [last]
            t2 = self._now()
            new, done = truncate_at_stop(new, stop, max_new_tokens - len(gen.tokens))
            gen.add_step(new, len(tokens) - 1, t1 - t0, t2 - t1)
            root = new[-1]
        gen.stopped_by = "eos" if done else "length"
        return gen
