"""Property tests: tree verification on the engine equals running each branch alone.

Random trees on tiny random Llama / Mistral / Qwen2 configs, float32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from methods.core.engine import Engine
from methods.core.tree import Tree

TOL = 1e-4


@st.composite
def tree_case(draw):
    n_nodes = draw(st.integers(1, 12))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n_nodes + 1)]
    prefix = draw(st.lists(st.integers(0, 96), min_size=1, max_size=20))
    tokens = draw(st.lists(st.integers(0, 96), min_size=n_nodes + 1, max_size=n_nodes + 1))
    next_token = draw(st.integers(0, 96))
    return parents, prefix, tokens, next_token


def _tree_tokens(tree: Tree, parents_tokens: dict[tuple[int, ...], int], root: int) -> list[int]:
    return [root] + [parents_tokens[p] for p in tree.paths]


def _sequential_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    engine.reset()
    return engine.forward(ids, commit=True).logits


def _branch_case(parents, tokens):
    tree = Tree.from_parents(parents)
    # Tree.from_parents renumbers nodes by (depth, path); give each path a token.
    token_of = {p: tokens[i + 1] for i, p in enumerate(tree.paths)}
    return tree, [tokens[0]] + [token_of[p] for p in tree.paths]


settings.register_profile("engine", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(settings.get_profile("engine"))
@given(case=tree_case())
def test_tree_forward_matches_each_branch(tiny, case):
    parents, prefix, tokens, _ = case
    engine = Engine(tiny, capacity=16)  # small on purpose: exercises cache growth
    tree, node_tokens = _branch_case(parents, tokens)

    engine.reset()
    engine.forward(prefix, commit=True)
    past = engine.cache.length
    out = engine.forward(
        node_tokens,
        position_ids=tree.depths + past,
        step_bias=engine.tree_bias(tree.visible),
    )
    for row in tree.retrieve.tolist():
        branch = [i for i in row if i >= 0]
        ref = _sequential_logits(engine, prefix + [node_tokens[i] for i in branch])[len(prefix):]
        got = out.logits[branch]
        assert (got - ref).abs().max().item() < TOL


@settings(settings.get_profile("engine"))
@given(case=tree_case(), data=st.data())
def test_keep_branch_then_continue_matches_sequential(tiny, case, data):
    parents, prefix, tokens, next_token = case
    engine = Engine(tiny, capacity=16)
    tree, node_tokens = _branch_case(parents, tokens)
    row = data.draw(st.sampled_from(tree.retrieve.tolist()))
    branch = [i for i in row if i >= 0]
    cut = data.draw(st.integers(1, len(branch)))  # accept a prefix of the branch
    kept = branch[:cut]

    engine.reset()
    engine.forward(prefix, commit=True)
    past = engine.cache.length
    engine.forward(node_tokens, position_ids=tree.depths + past, step_bias=engine.tree_bias(tree.visible))
    engine.cache.keep(kept)
    got = engine.forward([next_token], commit=True).logits[-1]

    seq = prefix + [node_tokens[i] for i in kept] + [next_token]
    ref = _sequential_logits(engine, seq)[-1]
    assert (got - ref).abs().max().item() < TOL


def test_walk_accepted_length_follows_the_steps_decoding_takes():
    """A step at t accepts a(t) and the next starts at t + a(t): the positions it jumps over
    do not count, so the walk differs from the mean over positions (here it lands on the good ones)."""
    from methods.core.tree import accepted_per_position, tree_search, walk_accepted_length

    chain = [(0,), (0, 0)]
    ranks = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 3], [2, 2], [0, 0]])
    assert accepted_per_position(ranks, chain) == [3, 1, 3, 2, 1, 3]
    # one sequence of 6: steps at 0 (3), 3 (2), 5 (3) -> 8 tokens / 3 steps
    assert walk_accepted_length(ranks, [6], chain) == pytest.approx(8 / 3)
    # two sequences of 3: steps at 0 (3) | 3 (2), 5 (3) -> 8 / 3 again; [2, 4] walks other positions
    assert walk_accepted_length(ranks, [3, 3], chain) == pytest.approx(8 / 3)
    assert walk_accepted_length(ranks, [2, 4], chain) == pytest.approx((3 + 3 + 3) / 3)  # 0 | 2, 5
    # a rank past max_rank ends the prefix even if the path set would hold it
    assert accepted_per_position(torch.tensor([[12, 0]]), [(12,), (12, 0)]) == [1]
    mean = 1 + sum(a - 1 for a in [3, 1, 3, 2, 1, 3]) / 6
    table = {t.get("name", t["size"]): t for t in tree_search(ranks, sizes=(2,), lengths=[6])}
    assert table["chain"]["per_position_accepted_length"] == pytest.approx(mean, abs=1e-4)
    assert table["chain"]["expected_accepted_length"] == pytest.approx(8 / 3, abs=1e-4)
    # the table reports the walk, not the mean over positions: the two differ by more than noise here
    chain_row = table["chain"]
    assert abs(chain_row["expected_accepted_length"] - chain_row["per_position_accepted_length"]) > 0.4
    assert "per_position_accepted_length" not in tree_search(ranks, sizes=(2,))[0]
    # with three levels the best two-level tree of each size is a candidate too, once
    deep = torch.tensor([[0, 0, 0]] * 3 + [[1, 5, 5]])
    table = tree_search(deep, sizes=(3,))
    assert table[0]["paths"] == [[0], [0, 0], [0, 0, 0]]
    assert [t["paths"] for t in table if t.get("name") == "shallow"] == [[[0], [0, 0], [1]]]


def test_best_tree_and_expected_length():
    from methods.core.tree import best_tree_paths, expected_accepted_length

    ranks = torch.tensor([[0, 0, 0], [0, 1, 0], [1, 0, 5], [0, 0, 12], [3, 0, 0]])
    chain = [(0,), (0, 0), (0, 0, 0)]
    assert expected_accepted_length(ranks, chain) == 1 + (3 + 2 + 1) / 5
    best = best_tree_paths(ranks, 3)
    assert best[0] == (0,) and set(best) <= {(0,), (0, 0), (1,), (0, 1), (0, 0, 0)}
    assert expected_accepted_length(ranks, best) >= expected_accepted_length(ranks, chain) - 1e-9
    tree = Tree.from_paths(best)  # prefix-closed: builds
    assert tree.draft_size == 3
