"""Static token trees: everything about a tree shape that can be computed once.

A tree is given as Medusa-style paths: each path lists, per depth, which top-k
candidate of that depth it takes (``(0,)`` = top-1 at depth 1, ``(0, 2)`` = its third
child). Node 0 is the root: the last committed token, fed again so that its logits
give the bonus token. Everything a decoder needs per step (mask block, depths,
root-to-leaf index paths) is a tensor built here once per shape, so the per-step code
is a handful of tensor ops with no Python loop over nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Path = tuple[int, ...]


@dataclass
class Tree:
    paths: list[Path]          # node i>0 is paths[i-1]; sorted by (depth, path)
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
        paths: list[Path] = []
        frontier: list[Path] = [()]
        for k in per_depth:
            frontier = [p + (c,) for p in frontier for c in range(k)]
            paths.extend(frontier)
        return cls.from_paths(paths)

    @classmethod
    def from_parents(cls, parents: Sequence[int], choices: Sequence[int] | None = None) -> Tree:
        """Build from a parent list (node 0 = root, parents[0] = -1), e.g. for random trees."""
        paths: dict[int, Path] = {0: ()}
        counters: dict[int, int] = {}
        for i in range(1, len(parents)):
            par = parents[i]
            if not 0 <= par < i:
                raise ValueError(f"node {i} has parent {par}; parents must precede children")
            c = choices[i] if choices is not None else counters.get(par, 0)
            counters[par] = counters.get(par, 0) + 1
            paths[i] = paths[par] + (c,)
        return cls.from_paths([paths[i] for i in range(1, len(parents))])


class TreeVerifier:
    """Per-decoder, per-device constants of a tree, and greedy acceptance without Python loops over nodes."""

    def __init__(self, tree: Tree, engine) -> None:
        self.tree = tree
        device = engine.device
        self.depths = tree.depths.to(device)
        self.bias = engine.tree_bias(tree.visible)
        self.candidate_index = tree.candidate_index.to(device)
        retrieve = tree.retrieve.to(device)
        self.valid = retrieve[:, 1:] >= 0
        self.child = retrieve[:, 1:].clamp(min=0)
        self.parent = retrieve[:, :-1].clamp(min=0)
        self.retrieve = retrieve

    def accept(self, node_tokens: torch.Tensor, logits: torch.Tensor) -> tuple[list[int], int, torch.Tensor]:
        """Longest root-to-leaf prefix whose drafts equal the target's greedy choices.

        Returns (accepted node indices, root first; the bonus token; greedy ids of all nodes).
        """
        greedy = logits.argmax(dim=-1)
        match = (node_tokens[self.child] == greedy[self.parent]) & self.valid
        lengths = match.to(torch.int32).cumprod(dim=1).sum(dim=1)
        best = int(lengths.argmax())
        nodes = self.retrieve[best, : int(lengths[best]) + 1].tolist()
        return nodes, int(greedy[nodes[-1]]), greedy


# -- choosing trees from measured acceptance ------------------------------------------------
def path_counts(ranks: torch.Tensor, max_rank: int = 10) -> dict[Path, int]:
    """How often each path would be accepted, from per-position ranks.

    ``ranks[i, d]`` is the rank of the true (greedy) token among draft depth d+1's
    candidates at position i. Position i accepts path (c_1..c_d) iff its ranks start with
    exactly that prefix; a rank >= ``max_rank`` ends the prefix.
    """
    counts: dict[Path, int] = {}
    for row in ranks.tolist():
        prefix: Path = ()
        for r in row:
            if r >= max_rank:
                break
            prefix = prefix + (int(r),)
            counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def best_tree_paths(ranks: torch.Tensor, size: int, max_rank: int = 10) -> list[Path]:
    """The ``size`` draft nodes with the highest acceptance frequency.

    The expected accepted length of a tree is 1 + sum over its nodes of P(node accepted),
    and P(child) <= P(parent), so the best tree of a given size is simply the top-``size``
    paths by frequency (ties broken towards shallower, lower-rank paths, which keeps the
    set prefix-closed).
    """
    counts = path_counts(ranks, max_rank)
    ordered = sorted(counts, key=lambda p: (-counts[p], len(p), p))
    chosen: list[Path] = []
    have: set[Path] = set()
    for p in ordered:
        if len(chosen) >= size:
            break
        if len(p) == 1 or p[:-1] in have:
            chosen.append(p)
            have.add(p)
    return chosen


def expected_accepted_length(ranks: torch.Tensor, paths: list[Path], max_rank: int = 10) -> float:
    """Teacher-forced mean accepted length of a tree: 1 + mean number of accepted drafts."""
    counts = path_counts(ranks, max_rank)
    return 1.0 + sum(counts.get(tuple(p), 0) for p in paths) / max(1, ranks.shape[0])
