"""Lookahead decoding: mask structure and losslessness."""

from __future__ import annotations

import pytest
import torch

from methods.core.engine import Engine
from methods.lookahead import LookaheadDecoder, lookahead_visibility
from methods.vanilla import VanillaDecoder


def test_visibility_structure():
    vis, off = lookahead_visibility(window=3, levels=2, guesses=2, ngram=3)
    assert vis.shape == (1 + 6 + 4, 1 + 6 + 4)
    assert vis[:, 0].all()  # everything sees the root
    la = lambda l, c: 1 + l * 3 + c  # noqa: E731
    assert vis[la(1, 2), la(0, 0)] and vis[la(1, 2), la(0, 2)] and vis[la(1, 2), la(1, 2)]
    assert not vis[la(1, 2), la(1, 1)] and not vis[la(0, 1), la(0, 2)]
    assert off[la(1, 2)] == 1 + 2 + 1
    g0 = 7  # first guess chain: tokens 7, 8
    assert vis[g0 + 1, g0] and not vis[g0, g0 + 1] and not vis[g0 + 2, g0]
    assert off[g0].item() == 1 and off[g0 + 1].item() == 2


@pytest.mark.parametrize("window,ngram,guesses,min_share", [(3, 3, 2, 0.1), (5, 4, 5, 0.1), (2, 2, 0, 0.0)])
def test_lookahead_is_lossless_on_tiny_models(tiny, window, ngram, guesses, min_share):
    """Prompts over a small alphabet fill the n-gram pool: with guesses, at least 10% of the steps
    must take several tokens; with none, no step may."""
    from tests.drafters import assert_lossless, held_out_prompts

    engine = Engine(tiny)
    decoder = LookaheadDecoder(engine, window=window, ngram=ngram, guesses=guesses)
    gens = assert_lossless(decoder, VanillaDecoder(engine), held_out_prompts(3, length=20, alphabet=15), 30,
                           min_share=min_share)
    if guesses == 0:
        assert all(a == 1 for g in gens for a in g.accepted)


def test_predicted_speedup_charges_every_step_its_pass_size():
    from types import SimpleNamespace

    from methods.lookahead.tune import predicted_speedup

    # prefill first (left out), then steps of 3 and 1 tokens with passes of 1 + 4 and 1 + 2 tokens
    gens = [SimpleNamespace(accepted=[1, 3, 1], processed=[0, 4, 2])]
    linear = lambda n: 0.5 + 0.5 * n  # noqa: E731 - t(1) = 1
    got = predicted_speedup(gens, linear)
    assert got["speedup"] == pytest.approx(4 / (3.0 + 2.0))
    assert got["mean_accepted_length"] == 2.0 and got["processed_per_step"] == 3.0


def test_tuner_follows_the_cost_curve(tmp_path, monkeypatch):
    """Under a cost that grows with every token fed, the tuner settles on a smaller pass than the
    default's; the result carries the shape, its prediction and the default's."""
    import json

    import methods.core.cost as cost
    from methods.core.training import Toolkit
    from methods.lookahead.tune import PRIORS, TuneConfig, tune_lookahead
    from tests.conftest import tiny_model
    from tests.test_self_spec import _CharTokenizer

    model = tiny_model("llama")
    steep = cost.CostCurve((1, 64), (1.0, 64.0))  # t(n) = n: every token fed costs a whole pass
    monkeypatch.setattr(cost, "cost_curve", lambda engine, name, cache: steep)
    kit = Toolkit(cache_dir=tmp_path, load_model=lambda *a, **k: (model, _CharTokenizer()),
                  training_prompts=lambda files, limit, seed: ["abcabcabcabc", "the cat the cat the cat"][:limit],
                  training_sequences=None, check_model=lambda name: None)
    out = tmp_path / "lookahead.json"
    result = tune_lookahead(TuneConfig(model="tiny", data=["train.jsonl"], out=str(out), trials=len(PRIORS) + 4,
                                       prompts=2, max_new_tokens=24), kit)
    saved = json.loads(out.read_text())
    assert saved == result and saved["trials"] == len(PRIORS) + 4
    assert saved["predicted_speedup"] >= saved["default_predicted_speedup"]
    W, N, G = saved["window"], saved["ngram"], saved["guesses"]
    default_pass = 5 * 3 + 5 * 3
    assert W * (N - 1) + G * (N - 1) < default_pass


def test_a_tuned_shape_replaces_the_options_and_says_so(tiny, tmp_path):
    import json

    from methods.core.errors import UserError

    engine = Engine(tiny)
    path = tmp_path / "la.json"
    path.write_text(json.dumps({"window": 2, "ngram": 3, "guesses": 1, "predicted_speedup": 1.1}))
    decoder = LookaheadDecoder(engine, tuned=str(path))
    assert (decoder.W, decoder.N, decoder.G) == (2, 3, 1)
    assert decoder.describe()["shape_from"] == str(path) and decoder.step_capacity() == 1 + 4 + 2
    # nothing ships for this model: auto falls back to the options
    plain = LookaheadDecoder(engine, window=3)
    assert (plain.W, plain.shape_from) == (3, "options")
    with pytest.raises(UserError, match="lookahead.window conflicts with the tuned shape"):
        LookaheadDecoder(engine, window=3, tuned=str(path))
    (tmp_path / "bad.json").write_text('{"window": 2}')
    with pytest.raises(UserError, match="bad.json is not a tune result"):
        LookaheadDecoder(engine, tuned=str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="cannot read"):
        LookaheadDecoder(engine, tuned=str(tmp_path / "missing.json"))


def test_the_shipped_tuned_shapes_load():
    """Every file in methods/lookahead/tuned/ is a tune result that loads."""
    import json

    from methods.lookahead.decoder import TUNED_DIR, load_shape

    shipped = sorted(TUNED_DIR.glob("*.json"))
    assert {p.name for p in shipped} >= {"smollm2-135m-cpu-float32.json", "smollm2-135m-cpu-bfloat16.json"}
    for path in shipped:
        data = json.loads(path.read_text())
        assert load_shape(path) == (data["window"], data["ngram"], data["guesses"])
        assert data["predicted_speedup"] >= data["default_predicted_speedup"]  # a tune never ships a loss


def test_upstream_visibility_structure():
    """The root is level 0's first column: node level * columns + col, at root + col + level."""
    from methods.lookahead import upstream_visibility

    vis, off = upstream_visibility(columns=3, levels=3, guesses=2, ngram=4)
    assert vis.shape == (9 + 6, 9 + 6)
    assert vis[:, 0].all()
    node = lambda l, c: l * 3 + c  # noqa: E731
    assert [off[node(l, c)].item() for l in range(3) for c in range(3)] == [0, 1, 2, 1, 2, 3, 2, 3, 4]
    # level 0 is a causal chain from the root
    assert vis[node(0, 2), :3].all() and not vis[node(0, 1), node(0, 2)]
    # (2, 1) sees level 0's columns 0..1, and its own column's levels 1 and 2 only
    seen = {i for i in range(9) if vis[node(2, 1), i]}
    assert seen == {node(0, 0), node(0, 1), node(1, 1), node(2, 1)}
    g0 = 9  # first guess chain: 9, 10, 11 at root + 1, 2, 3
    assert vis[g0 + 2, g0] and vis[g0 + 2, g0 + 1] and not vis[g0, g0 + 1] and not vis[g0 + 3, g0]
    assert off[g0:g0 + 3].tolist() == [1, 2, 3] and not vis[g0, 1:9].any()


@pytest.mark.parametrize("window,ngram,guesses", [(3, 3, 2), (5, 4, 5), (2, 5, 3), (1, 3, 1)])
def test_upstream_init_is_lossless_on_tiny_models(tiny, window, ngram, guesses):
    """Prompts over a small alphabet fill the pool once the window has: at least 5% of the steps
    must take several tokens."""
    from tests.drafters import assert_lossless, held_out_prompts

    engine = Engine(tiny)
    decoder = LookaheadDecoder(engine, window=window, ngram=ngram, guesses=guesses, init="upstream")
    assert_lossless(decoder, VanillaDecoder(engine), held_out_prompts(3, length=20, alphabet=15), 30, min_share=0.05)


def test_upstream_init_fills_the_window_before_guessing(tiny):
    """Upstream verifies no guess until all N - 1 levels exist (N - 2 fill steps here), even with a
    pool seeded from a repetitive prompt; ours guesses from the first step. Each fill step's pass
    carries one column fewer: W + N - 2 columns x levels at first, the root included."""
    engine = Engine(tiny)
    prompt = list(range(97))  # every token of the vocabulary starts an n-gram of the prompt: the root too
    W, N, G = 3, 5, 4
    ours = LookaheadDecoder(engine, window=W, ngram=N, guesses=G, tuned="none").generate(prompt, 20)
    up = LookaheadDecoder(engine, window=W, ngram=N, guesses=G, init="upstream", seed_from_prompt=True)
    got = up.generate(prompt, 20)
    assert ours.draft_sizes[1] > 0
    assert got.draft_sizes[1:N - 1] == [0] * (N - 2)
    widths = [levels * (W + N - 1 - levels) - 1 for levels in range(1, N - 1)]
    assert got.processed[1:N - 1] == widths == [5, 9, 11]
    assert got.processed[N - 1] - got.draft_sizes[N - 1] == (N - 1) * W - 1  # full: W x (N-1) with the root


def test_upstream_init_starts_from_an_empty_pool_and_a_seeded_random_window(tiny):
    engine = Engine(tiny)
    prompt = list(range(20, 40))
    up = LookaheadDecoder(engine, window=4, ngram=4, guesses=3, init="upstream")
    assert up.options.seed_from_prompt is False
    up.begin(prompt, None)
    first = [list(lv) for lv in up.levels]
    assert up.pool == {} and len(first) == 1 and len(first[0]) == 4 + 4 - 3
    assert set(first[0]) <= set(prompt) and first[0] != prompt[:5]
    up.begin(prompt, None)
    assert up.levels == first  # seeded per prompt: the same window every time
    up.begin(prompt[::-1], None)
    assert up.levels != first
    ours = LookaheadDecoder(engine, window=4, ngram=4, guesses=3, tuned="none")
    ours.begin(prompt, None)
    assert ours.options.seed_from_prompt is True and ours.pool


def test_upstream_window_at_its_fixed_point_predicts_the_continuation(tiny, monkeypatch):
    """With every window token set to the true greedy continuation, each window token sees exactly
    the true sequence before it, at the right positions: its logits are the causal model's at that
    position (a wrong mask or position changes them even where the argmax survives). So the last
    level's outputs are the next tokens, the harvested n-gram keyed by the next root is right, and
    the step after accepts a whole guess: N tokens."""
    engine = Engine(tiny)
    W, N, G = 3, 4, 2
    prompt = torch.randint(0, 97, (8,), generator=torch.Generator().manual_seed(5)).tolist()
    truth = VanillaDecoder(engine).generate(prompt, 20).tokens  # truth[k]: the token at root + k
    decoder = LookaheadDecoder(engine, window=W, ngram=N, guesses=G, init="upstream")
    begin = decoder.begin

    def converged(prompt_ids, out):
        begin(prompt_ids, out)
        decoder.levels = [truth[1:W]] + [truth[lv:lv + W] for lv in range(1, N - 1)]

    monkeypatch.setattr(decoder, "begin", converged)
    passes = []
    update = decoder.update

    def recording(draft, out, acc):
        passes.append(out.logits.float().clone())
        update(draft, out, acc)

    monkeypatch.setattr(decoder, "update", recording)
    got = decoder.generate(prompt, 12)
    full = torch.tensor([prompt + truth[:W + N]])
    with torch.no_grad():
        ref = tiny(full, attention_mask=torch.ones_like(full)).logits[0].float()
    first = passes[0]  # the first decode step: root + the converged window, no guesses yet
    assert first.shape[0] == (N - 1) * W
    for level in range(N - 1):
        for col in range(W):
            torch.testing.assert_close(first[level * W + col], ref[len(prompt) - 1 + 1 + col + level],
                                       atol=1e-4, rtol=1e-4, msg=f"window token ({level}, {col})")
    assert got.tokens == truth[:12]
    assert got.draft_sizes[1] == 0 and got.accepted[1] == 1  # empty pool: the root's token only
    assert decoder.pool  # harvested
    assert got.accepted[2] == N, got.accepted


def test_upstream_init_reads_no_shipped_tuned_shape(tiny):
    """tuned=auto with init=upstream runs the shape given: the shipped tables were tuned with ours."""
    from methods.lookahead.decoder import find_tuned

    engine = Engine(tiny)
    assert find_tuned("smollm2-135m", engine.device, engine.dtype) is not None  # ours would read this one
    up = LookaheadDecoder(engine, model_name="smollm2-135m", window=7, ngram=5, guesses=7, init="upstream")
    assert (up.W, up.N, up.G, up.shape_from, up.fitted) == (7, 5, 7, "options", None)
    assert up.describe()["init"] == "upstream"
