"""Static token trees: everything about a tree shape that can be computed once.

A tree is given as Medusa-style paths: each path lists, per depth, which top-k
candidate of that depth it takes (``(0,)`` = top-1 at depth 1, ``(0, 2)`` = its third
child). Node 0 is the root: the last committed token, fed again so that its logits
give the bonus token. Everything a decoder needs per step (mask block, depths,
root-to-leaf index paths) is a tensor built here once per shape, so the per-step code
is a handful of tensor ops with no Python loop over nodes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods.core.errors import UserError
from methods.core.files import read_text

TreePath = tuple[int, ...]


@dataclass
class Tree:
    paths: list[TreePath]          # node i>0 is paths[i-1]; sorted by (depth, path)
    parents: torch.Tensor      # [n] parent node index (root: -1)
    depths: torch.Tensor       # [n] 0 for the root
    visible: torch.Tensor      # [n, n] bool: node i attends to node j (ancestor or self)
    retrieve: torch.Tensor     # [leaves, max_depth + 1] node indices root->leaf, padded with -1
    candidate_index: torch.Tensor  # [n] index into [root, depth-1 top-k..., depth-2 top-k...]
    topk: int

    @property
    def size(self) -> int:
        return len(self.paths) + 1

    @property
    def draft_size(self) -> int:
        """Draft tokens verified per step: every node but the root."""
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> Tree:
        ordered = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
        if any(len(p) == 0 for p in ordered):
            raise ValueError("tree paths must be non-empty")
        index = {p: i + 1 for i, p in enumerate(ordered)}
        for p in ordered:
            if len(p) > 1 and p[:-1] not in index:
                raise ValueError(f"tree path {list(p)} has no parent path {list(p[:-1])}")
        n = len(ordered) + 1
        parents = [-1] + [index.get(p[:-1], 0) for p in ordered]
        depths = [0] + [len(p) for p in ordered]
        visible = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):  # once per shape, not per step
            visible[i] |= visible[parents[i]]
        prefixes = {p[:-1] for p in ordered}
        leaves = [p for p in ordered if p not in prefixes]
        max_depth = max(depths)
        retrieve = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
        for row, leaf in enumerate(leaves):
            retrieve[row, 0] = 0
            for d in range(1, len(leaf) + 1):
                retrieve[row, d] = index[leaf[:d]]
        topk = max(max(p) for p in ordered) + 1
        candidate_index = [0] + [topk * (len(p) - 1) + p[-1] + 1 for p in ordered]
        return cls(
            paths=ordered,
            parents=torch.tensor(parents),
            depths=torch.tensor(depths),
            visible=visible,
            retrieve=retrieve,
            candidate_index=torch.tensor(candidate_index),
            topk=topk,
        )

    @classmethod
    def from_topk(cls, per_depth: Sequence[int]) -> Tree:
        """The full tree taking top-``k_d`` at each depth d (e.g. ``[3, 2, 1]``)."""
        paths: list[TreePath] = []
        frontier: list[TreePath] = [()]
        for k in per_depth:
            frontier = [p + (c,) for p in frontier for c in range(k)]
            paths.extend(frontier)
        return cls.from_paths(paths)

    @classmethod
    def from_parents(cls, parents: Sequence[int], choices: Sequence[int] | None = None) -> Tree:
        """Build from a parent list (node 0 = root, parents[0] = -1), e.g. for random trees."""
        paths: dict[int, TreePath] = {0: ()}
        counters: dict[int, int] = {}
        for i in range(1, len(parents)):
            par = parents[i]
            if not 0 <= par < i:
                raise ValueError(f"node {i} has parent {par}; parents must precede children")
            c = choices[i] if choices is not None else counters.get(par, 0)
            counters[par] = counters.get(par, 0) + 1
            paths[i] = paths[par] + (c,)
        return cls.from_paths([paths[i] for i in range(1, len(parents))])


class TreeLayout:
    """One step's token layout as device tensors: everything the engine and verification need.

    Nodes are the tokens fed in one target pass, node 0 the root (the last emitted token).
    ``parents[i]`` is a node's tree parent (-1 for the root); a node whose parent is -2 is
    fed but is no draft (Lookahead's Jacobi window): it never appears on a path. A chain
    (each node the child of the one before) needs no mask and no positions: the engine's
    causal default is exact and fastest. Built once per static shape, or per step for a
    dynamic tree: construction is a few tensor ops per depth level, no loop over nodes.
    """

    def __init__(self, parents: torch.Tensor | Sequence[int], engine: Any, *, max_depth: int | None = None,
                 visible: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        device = engine.device
        parents = torch.as_tensor(parents, dtype=torch.long).to(device)
        n = int(parents.shape[0])
        self.n = n
        self.parents = parents
        arange = torch.arange(n, device=device)
        self.chain = visible is None and bool((parents == arange - 1).all())
        cand = parents >= 0
        self.draft_size = int(cand.sum())
        if max_depth is None:
            max_depth = self.draft_size
        # ancestors by pointer jumping along parents, one level per iteration
        anc = torch.eye(n, dtype=torch.bool, device=device)
        depth = torch.zeros(n, dtype=torch.long, device=device)
        cur = parents.clone()
        for _ in range(max_depth):
            has = cur >= 0
            anc |= (cur[:, None] == arange[None, :]) & has[:, None]
            depth += has.long()
            cur = torch.where(has, parents[cur.clamp(min=0)], cur)
        self.max_depth = int(depth.max()) if n else 0
        self.depths = depth
        if self.chain:
            self.bias, self.positions = None, None
        else:
            self.bias = engine.tree_bias(anc if visible is None else visible.to(device))
            self.positions = depth if positions is None else positions.to(device)
        # root-to-leaf paths over the draft nodes (root and candidates only)
        in_tree = cand | (arange == 0)
        has_child = torch.zeros(n, dtype=torch.bool, device=device)
        has_child[parents[cand]] = True
        leaves = arange[in_tree & ~has_child]
        D = self.max_depth
        retrieve = torch.full((len(leaves), D + 2), -1, dtype=torch.long, device=device)  # last column: scratch
        node = leaves.clone()
        for _ in range(D + 1):  # walk each leaf up to the root, writing node i at column depth[i]
            ok = node >= 0
            col = torch.where(ok, depth[node.clamp(min=0)], D + 1)
            retrieve.scatter_(1, col[:, None], torch.where(ok, node, -1)[:, None])
            node = torch.where(ok, parents[node.clamp(min=0)], node)
        self.retrieve = retrieve = retrieve[:, : D + 1].contiguous()
        self.valid = retrieve[:, 1:] >= 0
        self.child = retrieve[:, 1:].clamp(min=0)
        self.parent = retrieve[:, :-1].clamp(min=0)
        # sampling: node j is an earlier sibling of node i (same parent, lower index)
        self.earlier_sibling = (parents[:, None] == parents[None, :]) & cand[:, None] & (arange[None, :] < arange[:, None])

    @classmethod
    def from_tree(cls, tree: Tree, engine: Any) -> TreeLayout:
        return cls(tree.parents, engine, max_depth=tree.max_depth)


MAX_TREE_NODES = 512  # far beyond any useful tree; a typo like 100000 must not allocate gigabytes


def parse_tree(spec: Any) -> Tree:
    """A tree from ``"3x2x1"`` (top-k per depth), a JSON list of paths, or a path to such JSON."""
    if isinstance(spec, Tree):
        return spec
    shape_hint = "use top-k per depth like 3x2x1, a JSON list of paths like [[0],[1],[0,0]], or a JSON file of one"
    if isinstance(spec, str):
        text = spec.strip()
        path = Path(text)
        if path.is_file():
            text = read_text(path, "a tree file holds JSON paths like [[0],[1],[0,0]]").strip()
        if text.startswith("["):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"bad tree {spec!r}: malformed JSON ({exc.msg}); {shape_hint}") from None
        else:
            try:
                per_depth = [int(k) for k in text.lower().split("x")]
            except ValueError:
                raise UserError(f"bad tree {spec!r}: {shape_hint}") from None
            if not per_depth or any(k < 1 for k in per_depth):
                raise UserError(f"bad tree {spec!r}: every top-k must be at least 1")
            size, width = 0, 1
            for k in per_depth:
                width *= k
                size += width
                if size > MAX_TREE_NODES:
                    raise UserError(f"bad tree {spec!r}: more than {MAX_TREE_NODES} nodes")
            return Tree.from_topk(per_depth)
    if (not isinstance(spec, list) or not spec
            or not all(isinstance(p, list) and p and all(isinstance(c, int) and c >= 0 for c in p) for p in spec)):
        raise UserError(f"bad tree {spec!r}: {shape_hint}")
    if len(spec) > MAX_TREE_NODES:
        raise UserError(f"bad tree: {len(spec)} paths, more than {MAX_TREE_NODES}")
    try:
        return Tree.from_paths(spec)
    except ValueError as exc:
        raise UserError(f"bad tree: {exc}") from None


_CHAINS: dict[tuple[str, int], TreeLayout] = {}


def chain_layout(length: int, engine: Any) -> TreeLayout:
    """The layout of root + ``length`` chained drafts, built once per (device, length)."""
    key = (str(engine.device), length)
    layout = _CHAINS.get(key)
    if layout is None:
        layout = _CHAINS[key] = TreeLayout(list(range(-1, length)), engine, max_depth=length)
    return layout


# -- choosing trees from measured acceptance ------------------------------------------------
def path_counts(ranks: torch.Tensor, max_rank: int = 10) -> dict[TreePath, int]:
    """How often each path would be accepted, from per-position ranks.

    ``ranks[i, d]`` is the rank of the true (greedy) token among draft depth d+1's
    candidates at position i. Position i accepts path (c_1..c_d) iff its ranks start with
    exactly that prefix; a rank >= ``max_rank`` ends the prefix.
    """
    counts: dict[TreePath, int] = {}
    for row in ranks.tolist():
        prefix: TreePath = ()
        for r in row:
            if r >= max_rank:
                break
            prefix = prefix + (int(r),)
            counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def best_tree_paths(ranks: torch.Tensor, size: int, max_rank: int = 10) -> list[TreePath]:
    """The ``size`` draft nodes with the highest acceptance frequency.

    The expected accepted length of a tree is 1 + sum over its nodes of P(node accepted),
    and P(child) <= P(parent), so the best tree of a given size is simply the top-``size``
    paths by frequency (ties broken towards shallower, lower-rank paths, which keeps the
    set prefix-closed).
    """
    counts = path_counts(ranks, max_rank)
    ordered = sorted(counts, key=lambda p: (-counts[p], len(p), p))
    chosen: list[TreePath] = []
    have: set[TreePath] = set()
    for p in ordered:
        if len(chosen) >= size:
            break
        if len(p) == 1 or p[:-1] in have:
            chosen.append(p)
            have.add(p)
    return chosen


def expected_accepted_length(ranks: torch.Tensor, paths: list[TreePath], max_rank: int = 10) -> float:
    """Teacher-forced mean accepted length of a tree: 1 + mean number of accepted drafts."""
    counts = path_counts(ranks, max_rank)
    return 1.0 + sum(counts.get(tuple(p), 0) for p in paths) / max(1, ranks.shape[0])


def accepted_per_position(ranks: torch.Tensor, paths: Sequence[Sequence[int]], max_rank: int = 10) -> list[int]:
    """What a step anchored at each position would accept: 1 + its deepest draft on the tree."""
    tree = {tuple(int(c) for c in p) for p in paths}
    out = []
    for row in ranks.tolist():
        depth, prefix = 0, ()
        for r in row:
            prefix = prefix + (int(r),)
            if r >= max_rank or prefix not in tree:
                break
            depth += 1
        out.append(1 + depth)
    return out


def walk_accepted_length(ranks: torch.Tensor, lengths: Sequence[int], paths: Sequence[Sequence[int]],
                         max_rank: int = 10) -> float:
    """Teacher-forced accepted length as decoding *walks* an answer: a step at position t
    accepts a(t) tokens and the next step starts at t + a(t). ``ranks`` holds every answer
    position of each sequence, in order, ``lengths[i]`` of them for sequence i.

    Tokens over steps weights the positions a decoder really visits; the plain mean over
    positions also counts the well-predicted stretches it skips over, so it is higher and can
    rank trees differently (docs/tree-choice.md)."""
    accepted = accepted_per_position(ranks, paths, max_rank)
    tokens = steps = start = 0
    for n in lengths:
        p = 0
        while p < n:
            a = accepted[start + p]
            tokens, steps, p = tokens + a, steps + 1, p + a
        start += n
    return tokens / steps if steps else 1.0


def tree_search(ranks: torch.Tensor, sizes=(1, 2, 3, 4, 6, 8, 12, 16, 20, 30),
                lengths: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Teacher-forced accepted length of the best tree of each size, on validation positions.

    With ``lengths`` (``ranks`` then covers every answer position of each sequence, in order)
    ``expected_accepted_length`` is the decoding walk and the mean over positions is kept as
    ``per_position_accepted_length``; without, it is the mean over positions. Besides the
    best tree of each size, the best of each size with at most two draft levels (``shallow``)
    and the top-1 chain are candidates."""
    def entry(paths: list[TreePath], **extra: Any) -> dict[str, Any]:
        per_position = round(expected_accepted_length(ranks, paths), 4)
        if lengths is None:
            return {**extra, "expected_accepted_length": per_position, "paths": [list(p) for p in paths]}
        return {**extra, "expected_accepted_length": round(walk_accepted_length(ranks, lengths, paths), 4),
                "per_position_accepted_length": per_position, "paths": [list(p) for p in paths]}

    out, seen = [], set()
    for size in sizes:
        paths = best_tree_paths(ranks, size)
        out.append(entry(paths, size=len(paths)))
        seen.add(frozenset(paths))
    if ranks.shape[1] > 2:  # the best trees of at most two draft levels too: the deep nodes lose most out of domain
        for size in sizes:
            paths = best_tree_paths(ranks[:, :2], size)
            if frozenset(paths) not in seen:
                seen.add(frozenset(paths))
                out.append(entry(paths, size=len(paths), name="shallow"))
    depth = ranks.shape[1]
    chain = [tuple([0] * d) for d in range(1, depth + 1)]
    out.append(entry(chain, size=len(chain), name="chain"))
    return out


def tree_search_default(ranks: torch.Tensor, size: int) -> list[list[int]]:
    return [list(p) for p in best_tree_paths(ranks, size)]
