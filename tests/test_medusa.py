"""Medusa: tree buffers against the medusa-llm oracle, checkpoint layouts, and losslessness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from methods.core.engine import Engine
from methods.core.tree import parse_tree
from methods.medusa import MedusaDecoder, MedusaHeads, load_heads
from methods.core.tree import Tree
from methods.vanilla import VanillaDecoder


@pytest.mark.parametrize("per_depth", [[3], [3, 2], [1, 3, 2, 1], [4, 2, 1], [2, 2, 2, 2]])
def test_tree_matches_medusa_llm_buffers(per_depth):
    utils = pytest.importorskip("medusa.model.utils", reason="medusa-llm is a test dependency")
    ref = utils.generate_medusa_buffers([1, *per_depth], device="cpu")
    tree = Tree.from_topk(per_depth)
    assert torch.equal(ref["medusa_attn_mask"][0, 0].bool(), tree.visible)
    assert ref["medusa_position_ids"] == tree.depths.tolist() if isinstance(ref["medusa_position_ids"], list) \
        else torch.equal(torch.as_tensor(ref["medusa_position_ids"]), tree.depths)
    # tree_indices point into [root, head0 top-k, head1 top-k, ...]: compare as (depth, choice)
    offsets = [0, 1]
    for k in per_depth:
        offsets.append(offsets[-1] + k)
    def as_depth_choice(flat: int) -> tuple[int, int]:
        if flat == 0:
            return 0, 0
        depth = max(d for d in range(1, len(offsets) - 1) if offsets[d] <= flat)
        return depth, flat - offsets[depth]
    ours = [(0, 0)] + [(len(p), p[-1]) for p in tree.paths]
    assert [as_depth_choice(int(i)) for i in ref["tree_indices"]] == ours
    assert {tuple(r) for r in ref["retrieve_indices"].tolist()} == {tuple(r) for r in tree.retrieve.tolist()}


def test_parse_tree_forms(tmp_path):
    assert parse_tree("3x2x1").draft_size == 3 + 6 + 6
    assert parse_tree("[[0], [1], [0, 0]]").draft_size == 3
    f = tmp_path / "t.json"
    f.write_text("[[0], [0, 0], [0, 0, 0]]")
    assert parse_tree(str(f)).max_depth == 3


def _random_heads(model, num_heads: int, layout: str, seed: int = 0) -> MedusaHeads:
    cfg = model.config
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, num_heads, layout)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return heads


@pytest.mark.parametrize("layout", ["shared", "upstream"])
def test_checkpoint_round_trip(tmp_path, layout):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    heads = _random_heads(model, 3, layout)
    path = tmp_path / "medusa_lm_head.safetensors"
    save_file({f"medusa_head.{k}" if layout == "upstream" else k: v.contiguous()
               for k, v in heads.upstream_state_dict().items()}, str(path))
    loaded, _ = load_heads(path, model.config.hidden_size, model.config.vocab_size)
    assert loaded.layout == layout and loaded.num_heads == 3
    h = torch.randn(2, model.config.hidden_size)
    assert torch.allclose(loaded(h, model.lm_head), heads(h, model.lm_head))
    if layout == "upstream":
        assert set(heads.upstream_state_dict()) == {f"{k}.{s}" for k in range(3)
                                                    for s in ("0.linear.weight", "0.linear.bias", "1.weight")}


def _decoder_with(engine, heads, tree, tmp_path):
    import json

    folder = tmp_path / "heads"
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in heads.upstream_state_dict().items()}, str(folder / "heads.safetensors"))
    (folder / "config.json").write_text(json.dumps({"default_tree": tree}))
    return MedusaDecoder(engine, heads=str(folder))


@pytest.mark.parametrize("tree,min_share", [("1x1x1", 0.02), ("3x2x1", 0.1),
                                            ("[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]", 0.1)])
@pytest.mark.parametrize("layout", ["shared", "upstream"])
def test_medusa_is_lossless_on_tiny_model(tiny, trained, tree, min_share, layout, tmp_path):
    """Heads trained on the tiny model's own text (tests/drafters.py), so their guesses are
    accepted and a wrong verification would show: at least 10% of the steps take several tokens
    (2% with one guess per head, which the tiny Qwen2's heads seldom get right). The published
    layout's per-head vocabulary projections learn slower on the tiny corpus (12-16% of steps
    over these prompts when trained in float32), so half the share is asked of them."""
    from tests.drafters import assert_lossless, held_out_prompts

    engine = Engine(tiny)
    folder = trained.medusa(tiny.config.model_type, layout)
    heads, _ = load_heads(next(Path(folder).glob("*.safetensors")), tiny.config.hidden_size, tiny.config.vocab_size)
    assert heads.layout == layout
    decoder = _decoder_with(engine, heads, tree, tmp_path)
    share = min_share if layout == "shared" else min_share / 2
    for got in assert_lossless(decoder, VanillaDecoder(engine), held_out_prompts(8), 30, min_share=share):
        assert len(got.accepted) == len(got.draft_sizes)


def test_the_report_names_medusa_heads_by_layout(tmp_path):
    """The published layout (an LM head per head) and the shipped one (the model's LM head shared)
    are both "medusa": the manifest and the report's draft-parameters table tell them apart."""
    from harness.report import draft_rows
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    engine = Engine(model)
    methods = {}
    for layout in ("shared", "upstream"):
        folder = tmp_path / layout
        folder.mkdir()
        heads = _random_heads(model, 2, layout)
        save_file({k: v.contiguous() for k, v in heads.upstream_state_dict().items()}, str(folder / "heads.safetensors"))
        methods[f"medusa@heads={folder}"] = MedusaDecoder(engine, heads=str(folder), tree="2x1").describe()
    rows = {r["drafter"]: r for r in draft_rows({"methods": methods})}
    assert set(rows) == {"2 heads sharing the model's LM head",
                         "2 heads, each with its own LM head (Medusa-1 as published)"}
    vocab = model.config.vocab_size * model.config.hidden_size
    shared, upstream = (int(rows[d]["parameters"].replace(",", "")) for d in sorted(rows, key=len))
    assert upstream - shared == 2 * vocab  # each published head's own projection to the vocabulary


def test_medusa_accepts_when_heads_are_oracles(tmp_path):
    """A model that repeats its last token makes the heads' guesses right (zero-initialised heads
    copy the base model's guess): every step must accept its whole 3-deep chain."""
    from tests.conftest import repeating_model

    model = repeating_model("llama")
    engine = Engine(model)
    heads = MedusaHeads(model.config.hidden_size, model.config.vocab_size, 3, "shared")  # zero init: copies base guess
    decoder = _decoder_with(engine, heads, "1x1x1", tmp_path)
    ref = VanillaDecoder(engine).generate([1, 2, 3], 40)
    got = decoder.generate([1, 2, 3], 40)
    assert got.tokens == ref.tokens
    assert got.mean_accepted_length() > 3.5  # 4 tokens a step (3 drafts and the bonus), the prefill's one aside


def test_medusa_stops_at_stop_token(tiny, tmp_path):
    engine = Engine(tiny)
    decoder = _decoder_with(engine, _random_heads(tiny, 3, "shared"), "2x2x1", tmp_path)
    free = VanillaDecoder(engine).generate([4, 5, 6], 20).tokens
    stop = free[5]
    got = decoder.generate([4, 5, 6], 20, stop=[stop])
    assert got.tokens == free[: free.index(stop) + 1] and got.stopped_by == "eos"
