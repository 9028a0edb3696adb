"""Self-speculative decoding: lossless for any skip set; transformers' early-exit assistant as oracle."""

from __future__ import annotations

import pytest
import torch

from methods.core.engine import Engine
from methods.self_spec import SelfSpeculativeDecoder, load_skip_set
from methods.vanilla import VanillaDecoder


@pytest.mark.parametrize("skip,threshold,adaptive,min_share", [
    ({"attention": [1], "mlp": [2]}, 0.0, False, 0.1),
    ({"attention": [0, 2], "mlp": []}, 0.3, True, 0.02),
    ({"attention": [], "mlp": [0, 1, 2]}, 0.9, True, 0.1),
])
def test_self_spec_is_lossless_on_tiny_models(tiny, skip, threshold, adaptive, min_share):
    """On the tiny model with a peaked LM head (tests/drafters.py) the skipping draft often picks
    the full model's token, so drafts are verified and accepted: at least 10% of the steps must
    take several tokens (a random model's flat distributions would draft nothing); 2% where
    two of three attention sublayers are skipped, whose drafts the tiny Qwen2 seldom accepts."""
    from tests.drafters import assert_lossless, confident_model, held_out_prompts

    engine = Engine(confident_model(tiny.config.model_type))
    decoder = SelfSpeculativeDecoder(engine, skip=skip, threshold=threshold, adaptive=adaptive, max_draft=5,
                                     policy="always")
    assert_lossless(decoder, VanillaDecoder(engine), held_out_prompts(3), 25, min_share=min_share)


def test_no_skipping_accepts_every_confident_draft(tiny):
    engine = Engine(tiny)
    decoder = SelfSpeculativeDecoder(engine, skip={"attention": [], "mlp": []}, threshold=0.0, adaptive=False,
                                     max_draft=4, policy="always")
    got = decoder.generate([1, 2, 3], 21)
    assert got.tokens == VanillaDecoder(engine).generate([1, 2, 3], 21).tokens
    assert all(a == d + 1 for a, d in zip(got.accepted[1:-1], got.draft_sizes[1:-1]))


def test_cost_policy_pauses_drafting_that_does_not_pay(tiny, monkeypatch, tmp_path):
    """A draft as dear as the full model never pays: the cost policy falls back to plain steps
    (doubling pauses), 'always' keeps drafting; both stay lossless."""
    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path))
    engine = Engine(tiny)
    nothing_skipped = {"attention": [], "mlp": []}
    prompt = [1, 2, 3]
    ref = VanillaDecoder(engine).generate(prompt, 60).tokens
    always = SelfSpeculativeDecoder(engine, skip=nothing_skipped, threshold=0.0, adaptive=False, max_draft=4,
                                    policy="always").generate(prompt, 60)
    cost = SelfSpeculativeDecoder(engine, skip=nothing_skipped, threshold=0.0, adaptive=False, max_draft=4,
                                  policy="cost")
    assert cost.draft_cost > 0  # measured at set-up (too noisy on a tiny model to pin down)
    cost.draft_cost = 1.5  # a draft dearer than the step it saves: no acceptance can pay for it
    got = cost.generate(prompt, 60)
    assert got.tokens == ref == always.tokens
    assert all(d > 0 for d in always.draft_sizes[1:-1])  # prefill drafts nothing; the last step may lack room
    plain = sum(1 for d in got.draft_sizes if d == 0)
    assert plain > len(got.draft_sizes) / 2, got.draft_sizes
    # a free draft pays: with its cost measured as zero the policy never pauses
    cheap = SelfSpeculativeDecoder(engine, skip=nothing_skipped, threshold=0.0, adaptive=False, max_draft=4)
    cheap.draft_cost = 0.0
    assert all(d > 0 for d in cheap.generate(prompt, 40).draft_sizes[1:-1])


def test_cost_policy_drafts_another_token_only_while_the_chain_can_pay(tiny, monkeypatch, tmp_path):
    """Another draft forward runs only while the chain's confidence covers its cost plus one more
    verified token: free drafts run to max_draft, dear ones stop after the first token."""
    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path))
    engine = Engine(tiny)
    prompt = [1, 2, 3]
    ref = VanillaDecoder(engine).generate(prompt, 40).tokens
    sizes = {}
    for draft_cost in (0.0, 0.9):
        decoder = SelfSpeculativeDecoder(engine, skip={"attention": [], "mlp": []}, threshold=0.0, adaptive=False,
                                         max_draft=4, policy="cost")
        decoder.draft_cost = draft_cost
        decoder.verify_cost = lambda n: 1.0  # flat: only the draft forward costs
        decoder.efficiency, decoder.pause = 10.0, 0  # keep the pause logic out of it
        got = decoder.generate(prompt, 40)
        assert got.tokens == ref
        sizes[draft_cost] = got.draft_sizes[1:-1]
    assert max(sizes[0.0]) == 4 and all(d == 4 for d in sizes[0.0][:3]), sizes
    # a tiny random model is never 90% sure of two tokens in a row
    assert max(sizes[0.9]) == 1 and 1 in sizes[0.9], sizes


def test_plain_steps_leave_the_adaptive_threshold_alone(tiny, monkeypatch, tmp_path):
    """A paused (plain) step carries no evidence about drafts; lowering the threshold on each would
    make the probe after a long pause draft everything up to max_draft."""
    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path))
    engine = Engine(tiny)
    decoder = SelfSpeculativeDecoder(engine, skip={"attention": [], "mlp": []}, threshold=0.6, adaptive=True,
                                     max_draft=4, policy="cost")
    decoder.draft_cost = 1.5  # never pays: mostly plain steps
    seen: list[tuple[int, float, float]] = []
    update = decoder.update

    def recording(draft, out, acc):
        before = decoder.threshold
        update(draft, out, acc)
        seen.append((decoder.forwards, before, decoder.threshold))

    monkeypatch.setattr(decoder, "update", recording)
    decoder.generate([1, 2, 3], 60)
    plain = [(b, a) for f, b, a in seen if f == 0]
    assert len(plain) > 20 and all(b == a for b, a in plain), seen
    assert any(b != a for f, b, a in seen if f > 0)  # drafting steps still adapt it


def test_paper_update_against_hand_computed_values():
    """Upstream's rule, step by step (alpha 0.9, epsilon 0.01, beta1 0.5, beta2 0.9)."""
    from methods.self_spec.decoder import paper_update

    k = dict(alpha=0.9, epsilon=0.01, beta1=0.5, beta2=0.9)
    # 2 of 4 accepted from a fresh prompt: matchness 0.5 * 0 + 0.5 * 0.5 = 0.25 < 0.9, so the threshold
    # heads for 0.81 and moves a tenth of the way: 0.9 * 0.8 + 0.1 * 0.81 = 0.801
    th, m = paper_update(0.8, 0.0, 2, 4, 8, **k)
    assert (th, m) == (pytest.approx(0.801), pytest.approx(0.25))
    # all 4 accepted after matchness 0.9: 0.45 + 0.5 = 0.95 >= 0.9, a short draft: down to 0.79, so 0.799
    th, m = paper_update(0.8, 0.9, 4, 4, 8, **k)
    assert (th, m) == (pytest.approx(0.799), pytest.approx(0.95))
    # the same with a draft that reached max_draft: the threshold did not cut it, so it holds
    th, m = paper_update(0.8, 0.9, 8, 8, 8, **k)
    assert (th, m) == (pytest.approx(0.8), pytest.approx(0.95))
    # no clamp (upstream has none): 0.999 + 0.1 * 0.01 = 1.0, past what ours allows (0.99)
    assert paper_update(0.999, 0.0, 0, 1, 8, **k)[0] == pytest.approx(1.0)
    # unsmoothed (beta2 = 0) the threshold takes the whole step
    assert paper_update(0.5, 0.0, 0, 3, 8, alpha=0.9, epsilon=0.01, beta1=0.5, beta2=0.0)[0] == pytest.approx(0.51)


def test_ours_update_against_hand_computed_values():
    from methods.self_spec.decoder import ours_update

    k = dict(target=0.8, epsilon=0.05, beta1=0.9, beta2=0.0)
    th, rate = ours_update(0.6, 0.8, 1, 2, **k)  # rate 0.72 + 0.05 = 0.77 < 0.8: up by 0.05
    assert (th, rate) == (pytest.approx(0.65), pytest.approx(0.77))
    assert ours_update(0.6, 0.8, 0, 0, **k) == (pytest.approx(0.55), 0.8)  # nothing drafted: down, rate kept
    assert ours_update(0.98, 0.0, 0, 2, **k)[0] == 0.99 and ours_update(0.07, 1.0, 2, 2, **k)[0] == 0.05  # clamped


def test_each_rule_has_its_own_defaults_and_typed_values_win():
    from methods.core.options import parse_options
    from methods.self_spec import SelfSpecOptions

    ours = parse_options(SelfSpecOptions, {}, where="self_spec")
    assert (ours.rule, ours.threshold, ours.target_acceptance, ours.policy) == ("ours", 0.6, 0.8, "cost")
    assert (ours.epsilon, ours.beta1, ours.beta2) == (0.05, 0.9, 0.0)
    paper = parse_options(SelfSpecOptions, {"rule": "paper"}, where="self_spec")
    assert (paper.threshold, paper.target_acceptance, paper.policy) == (0.8, 0.9, "always")
    assert (paper.epsilon, paper.beta1, paper.beta2) == (0.01, 0.5, 0.9)
    mixed = parse_options(SelfSpecOptions, {"rule": "paper", "policy": "cost", "epsilon": "0.02"}, where="self_spec")
    assert (mixed.policy, mixed.epsilon, mixed.threshold) == ("cost", 0.02, 0.8)


@pytest.mark.parametrize("skip,threshold,adaptive", [
    ({"attention": [1], "mlp": [2]}, 0.0, False),
    ({"attention": [0, 2], "mlp": []}, None, True),
    ({"attention": [], "mlp": [0, 1, 2]}, 0.95, True),
])
def test_paper_rule_is_lossless_on_tiny_models(tiny, skip, threshold, adaptive):
    """On the peaked-head tiny model (tests/drafters.py) the paper's drafts are often accepted: at
    least 5% of the steps must take several tokens."""
    from tests.drafters import assert_lossless, confident_model, held_out_prompts

    engine = Engine(confident_model(tiny.config.model_type))
    extra = {} if threshold is None else {"threshold": threshold}
    decoder = SelfSpeculativeDecoder(engine, skip=skip, adaptive=adaptive, max_draft=5, rule="paper", **extra)
    assert_lossless(decoder, VanillaDecoder(engine), held_out_prompts(3), 25, min_share=0.05)


def test_paper_rule_keeps_the_unsure_token_and_stops_there(tiny):
    """At a threshold no draft reaches, the paper's rule still verifies one token per step (the one
    that fell under it); ours drafts nothing."""
    engine = Engine(tiny)
    nothing_skipped = {"attention": [], "mlp": []}
    prompt = [1, 2, 3]
    ref = VanillaDecoder(engine).generate(prompt, 20).tokens
    sizes = {}
    for rule in ("paper", "ours"):
        got = SelfSpeculativeDecoder(engine, skip=nothing_skipped, threshold=1.0, adaptive=False, max_draft=4,
                                     policy="always", rule=rule).generate(prompt, 20)
        assert got.tokens == ref
        sizes[rule] = got.draft_sizes[1:-1]
    assert set(sizes["paper"]) == {1}, sizes
    assert set(sizes["ours"]) == {0}, sizes


def test_paper_threshold_carries_across_prompts_ours_restarts(tiny):
    engine = Engine(tiny)
    skip = {"attention": [0, 2], "mlp": []}
    paper = SelfSpeculativeDecoder(engine, skip=skip, max_draft=4, rule="paper")
    assert paper.threshold == 0.8 and paper.options.policy == "always"
    paper.generate([1, 2, 3], 30)
    after = paper.threshold
    assert after != 0.8  # it adapted during the prompt
    paper.begin([4, 5, 6], None)
    assert paper.threshold == after and paper.rate == 0.0  # the smoothed acceptance restarts, as upstream's
    ours = SelfSpeculativeDecoder(engine, skip=skip, max_draft=4, policy="always")
    ours.generate([1, 2, 3], 30)
    assert ours.threshold != 0.6
    ours.begin([4, 5, 6], None)
    assert (ours.threshold, ours.rate) == (0.6, 0.8)


def test_load_skip_set_forms(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"attention": [3, 1], "mlp": [2]}')
    assert load_skip_set(str(f)) == {"attention": [1, 3], "mlp": [2]}
    assert load_skip_set('{"mlp": [5]}') == {"attention": [], "mlp": [5]}


@pytest.mark.slow
def test_early_exit_skip_set_matches_transformers_assistant_early_exit(smollm):
    from methods.core.prompts import encode_conversation, stop_token_ids

    model, tok = smollm
    exit_layer = 20
    skip = {"attention": list(range(exit_layer, 30)), "mlp": list(range(exit_layer, 30))}
    decoder = SelfSpeculativeDecoder(Engine(model), skip=skip, threshold=0.0, adaptive=False, max_draft=5)
    stop = stop_token_ids(tok, model)
    prompt = encode_conversation(tok, [{"role": "user", "content": "List three uses of a paperclip."}])
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=32, do_sample=False, assistant_early_exit=exit_layer, eos_token_id=stop)
    got = decoder.generate(prompt, 32, stop)
    assert got.tokens == ref[0, len(prompt):].tolist()


class _CharTokenizer:
    """Enough of a tokenizer for the tuner: no chat template, one id per character."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_tuner_searches_contiguous_blocks_from_the_priors(tmp_path):
    """The block space's priors run first (attention in the upper half before any MLP), every
    trial is one attention block and one MLP block inside 1..L-2, and the result says so."""
    import json

    from methods.core.errors import UserError
    from methods.core.training import Toolkit
    from methods.self_spec.tune import TuneConfig, blocks_space, tune_self_spec
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    L = model.config.num_hidden_layers
    suggest, priors = blocks_space(L)
    assert priors[0]["mlp_len"] == 0 and priors[0]["attn_first"] == L // 2
    kit = Toolkit(cache_dir=tmp_path, load_model=lambda *a, **k: (model, _CharTokenizer()),
                  training_prompts=lambda files, limit, seed: ["add two and two", "is the sky blue"][:limit],
                  training_sequences=None, check_model=lambda name: None)
    out = tmp_path / "skip.json"
    config = TuneConfig(model="tiny", data=["train.jsonl"], out=str(out), trials=len(priors) + 2, prompts=2,
                        max_new_tokens=6)
    from methods.self_spec import decoder as decoder_module

    made = []
    real_init = decoder_module.SelfSpeculativeDecoder.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self.options)

    decoder_module.SelfSpeculativeDecoder.__init__ = spy
    try:
        result = tune_self_spec(config, kit)
    finally:
        decoder_module.SelfSpeculativeDecoder.__init__ = real_init
    saved = json.loads(out.read_text())
    assert saved["space"] == "blocks" and saved["trials"] == len(priors) + 2 and saved["draft_tokens"] == 4
    # every trial drafts a fixed length without the adaptive exit, so a cheap wrong draft pays for itself
    assert made and all(o.max_draft == 4 and o.threshold == 0.0 and not o.adaptive and o.policy == "always"
                        for o in made)
    for kind in ("attention", "mlp"):
        layers = saved[kind]
        assert layers == list(range(layers[0], layers[0] + len(layers))) if layers else True
        assert all(1 <= i <= L - 2 for i in layers)
    assert result["speedup"] > 0
    with pytest.raises(UserError, match="blocks, free"):
        tune_self_spec(TuneConfig(data=["x"], out=str(out), space="bits"), kit)
    with pytest.raises(UserError, match="--draft"):
        tune_self_spec(TuneConfig(data=["x"], out=str(out), draft=0), kit)
