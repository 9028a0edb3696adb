"""The shared decode loop: multi-token acceptance with oracle drafters, dynamic layouts, typed options,
method variants, and lossless sampling for every method (with a negative control that must fail)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from methods.core.decoder import Decoder, Draft, GenConfig
from methods.core.engine import Engine
from methods.core.errors import UserError
from methods.core.tree import Tree, TreeLayout, chain_layout
from methods.vanilla import VanillaDecoder
from tests.conftest import tiny_model


class OracleChain(Decoder):
    """Proposes vanilla's own next ``depth`` tokens: every draft must be accepted."""

    depth = 3
    reference: list[int] = []

    def step_capacity(self) -> int:
        return self.depth + 1

    def begin(self, prompt_ids, out) -> None:
        self.emitted = 1  # the prefill's token

    def draft(self, root, root_t, room):
        k = min(self.depth, room)
        nxt = self.reference[self.emitted:self.emitted + k]
        return Draft(torch.cat([root_t, torch.tensor(nxt, dtype=torch.long)]), chain_layout(len(nxt), self.engine))

    def update(self, draft, out, acc) -> None:
        self.emitted += len(acc.tokens)


class OracleTree(OracleChain):
    """A tree whose first branch is wrong and whose second branch is vanilla's continuation."""

    def draft(self, root, root_t, room):
        k = min(self.depth, room)
        nxt = self.reference[self.emitted:self.emitted + k]
        if k == 0:
            return Draft(root_t, chain_layout(0, self.engine))
        wrong = [(t + 1) % 97 for t in nxt]
        # nodes: root, wrong chain (1..k), right chain (k+1..2k)
        parents = [-1] + [0] + list(range(1, k)) + [0] + list(range(k + 1, 2 * k))
        tokens = torch.tensor([root, *wrong, *nxt])
        return Draft(tokens, TreeLayout(parents, self.engine, max_depth=k))

    def step_capacity(self) -> int:
        return 2 * self.depth + 1


@pytest.mark.parametrize("oracle", [OracleChain, OracleTree])
def test_oracle_drafts_are_all_accepted(tiny, oracle):
    engine = Engine(tiny)
    prompt = [3, 14, 15, 92, 65]
    ref = VanillaDecoder(engine).generate(prompt, 22).tokens
    decoder = oracle(engine)
    decoder.reference = ref
    got = decoder.generate(prompt, 22)
    assert got.tokens == ref
    # prefill commits 1; every full step commits depth + 1 (drafts + bonus); the last may be cut short
    assert got.accepted[0] == 1
    assert got.accepted[1:-1] == [oracle.depth + 1] * (len(got.accepted) - 2)
    assert len(got.step_times) == len(got.accepted) and all(t > 0 for t in got.step_times)


def test_dynamic_layout_matches_static_tree():
    model = tiny_model("llama")
    engine = Engine(model)
    for per_depth in ([3, 2, 1], [1, 1, 1, 1], [4], [2, 3]):
        tree = Tree.from_topk(per_depth)
        layout = TreeLayout(tree.parents, engine)
        if per_depth == [1, 1, 1, 1]:  # a chain: the engine's causal default, no mask at all
            assert layout.chain and layout.bias is None and layout.positions is None
        else:
            assert torch.equal(layout.bias, engine.tree_bias(tree.visible))
        assert torch.equal(layout.depths, tree.depths)
        assert {tuple(r) for r in layout.retrieve.tolist()} == {tuple(r) for r in tree.retrieve.tolist()}
        assert layout.draft_size == tree.draft_size and layout.max_depth == tree.max_depth
    chain = chain_layout(4, engine)
    assert chain.chain and chain.bias is None and chain.retrieve.tolist() == [[0, 1, 2, 3, 4]]


# -- typed options and variants ---------------------------------------------------------------
def test_options_are_typed_and_validated():
    from methods.core.options import parse_options
    from methods.pld import PldOptions

    assert parse_options(PldOptions, {"num_tokens": "5"}, where="pld").num_tokens == 5
    with pytest.raises(UserError, match=r"unknown option pld.num_token; valid options for pld: max_ngram, num_tokens"):
        parse_options(PldOptions, {"num_token": "5"}, where="pld")
    with pytest.raises(UserError, match="expected an integer, got 'x'"):
        parse_options(PldOptions, {"num_tokens": "x"}, where="pld")
    with pytest.raises(UserError, match="below the minimum 1"):
        parse_options(PldOptions, {"num_tokens": "-4"}, where="pld")


def test_method_variants_parse_and_merge_options():
    from harness.config import parse_method_runs, split_methods

    labels = split_methods('vanilla,medusa,medusa@tree=[[0],[1],[0,0]],pld@num_tokens=4@max_ngram=2')
    assert labels == ["vanilla", "medusa", "medusa@tree=[[0],[1],[0,0]]", "pld@num_tokens=4@max_ngram=2"]
    runs = parse_method_runs(labels, {"medusa": {"tree": "2x1"}, "pld": {"num_tokens": "9"}})
    assert [r.label for r in runs] == labels
    assert runs[1].options.tree == "2x1" and runs[2].options.tree == "[[0],[1],[0,0]]"
    assert runs[3].options.num_tokens == 4 and runs[3].options.max_ngram == 2
    with pytest.raises(UserError, match="unknown option medusa.hedas"):
        parse_method_runs(["medusa@hedas=x"], {})
    with pytest.raises(UserError, match="bad tree"):
        parse_method_runs(["medusa@tree=100000"], {})


# -- sampling: every method keeps the target distribution -----------------------------------------
VOCAB, NEW, SAMPLES, TEMPERATURE = 12, 5, 2000, 0.8  # 5 new tokens: room for chains of 3 drafts and the bonus
PROMPT = [1, 2, 3, 10, 0, 4, 3, 10, 7, 3, 10, 7, 3, 3, 3, 3]  # with the model's own loop: every method drafts


def _sampling_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         attn_implementation="sdpa", tie_word_embeddings=False))
    with torch.no_grad():  # peaked next-token distributions, so drafts are often accepted
        model.lm_head.weight.mul_(60.0)
    return model.eval().requires_grad_(False)


def _exact_joint(model, floor: float = 1e-7) -> dict[tuple[int, ...], float]:
    """P(first NEW tokens) under the target's temperature-T distribution, by enumeration over
    the prefixes of probability >= ``floor`` (the rest, a known remainder, is pooled)."""
    from methods.core.verify import target_probs

    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(NEW):
        prefixes = [k for k, v in frontier.items() if v >= floor]
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + list(k) for k in prefixes])).logits[:, -1]
        p = target_probs(logits, TEMPERATURE, 1.0).tolist()
        frontier = {k + (c,): frontier[k] * p[i][c] for i, k in enumerate(prefixes) for c in range(VOCAB)}
    return frontier


def _decoders(engine, tmp_path) -> dict[str, Decoder]:
    from methods.firp import FirpDecoder, FirpMaps
    from methods.lookahead import LookaheadDecoder
    from methods.medusa import MedusaDecoder, MedusaHeads
    from methods.pld import PromptLookupDecoder
    from methods.self_spec import SelfSpeculativeDecoder

    cfg = engine.config
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, 2, "shared")  # zero-init: the base model's guesses
    (tmp_path / "medusa").mkdir()
    save_file({k: v.contiguous() for k, v in heads.upstream_state_dict().items()},
              str(tmp_path / "medusa" / "heads.safetensors"))
    (tmp_path / "medusa" / "config.json").write_text(json.dumps({}))
    maps = FirpMaps(cfg.hidden_size, [1, 1])
    (tmp_path / "firp").mkdir()
    save_file({k: v.contiguous() for k, v in maps.state_dict().items()}, str(tmp_path / "firp" / "firp.safetensors"))
    (tmp_path / "firp" / "config.json").write_text(json.dumps(maps.config()))
    from methods.eagle import EagleDecoder
    from methods.sps import SpsDecoder
    from tests.test_eagle import random_head, save_head

    draft = _sampling_model()  # the target with a flatter head: q differs from p, so min(1, p/q) and the
    with torch.no_grad():      # residual max(p - q, 0) both matter
        draft.lm_head.weight.mul_(0.6)
    draft.save_pretrained(tmp_path / "sps-draft")
    return {
        "sps": SpsDecoder(engine, draft=str(tmp_path / "sps-draft"), gamma=3),
        "eagle": EagleDecoder(engine, head=save_head(random_head(engine), tmp_path / "eagle"), depth=2, topk=4,
                              total=8),
        "vanilla": VanillaDecoder(engine),
        "pld": PromptLookupDecoder(engine, num_tokens=3),
        "lookahead": LookaheadDecoder(engine, window=2, ngram=3, guesses=3),
        "medusa": MedusaDecoder(engine, heads=str(tmp_path / "medusa"), tree="2x2"),
        "firp": FirpDecoder(engine, weights=str(tmp_path / "firp"), tree="2x1"),
        "self_spec": SelfSpeculativeDecoder(engine, skip={"attention": [1], "mlp": []}, threshold=0.0,
                                            adaptive=False, max_draft=3, policy="always"),
    }


def _sample(decoder: Decoder) -> tuple[Counter, int, int]:
    """(counts of the first NEW tokens, samples with a multi-token step, samples that verified a chain of 3+ drafts)."""
    counts: Counter = Counter()
    multi = long = 0
    for seed in range(SAMPLES):
        gen = decoder.generate(PROMPT, GenConfig(NEW, temperature=TEMPERATURE, seed=seed))
        counts[tuple(gen.tokens[:NEW])] += 1
        multi += any(a > 1 for a in gen.accepted[1:])
        long += any(d >= 3 for d in gen.draft_sizes)
    return counts, multi, long


def _chi_square_p(counts: Counter, joint: dict[tuple[int, ...], float]) -> float:
    """Goodness of fit against the exact joint; cells expected below 5 are pooled."""
    from scipy.stats import chisquare

    n = sum(counts.values())
    obs, exp = [], []
    for cell, prob in joint.items():
        if prob * n >= 5:
            obs.append(counts.get(cell, 0))
            exp.append(prob * n)
    obs.append(n - sum(obs))  # every other cell, enumerated or not, pooled
    exp.append(max(n - sum(exp), 1e-9))
    total = sum(exp)
    return float(chisquare(obs, [e * n / total for e in exp]).pvalue)


ALPHA = 1e-3  # eight methods at this level: a false alarm about once in 125 runs; seeds fix it, so never flaky


@pytest.fixture(scope="module")
def sampling_setup(tmp_path_factory):
    model = _sampling_model()
    engine = Engine(model)
    return engine, _exact_joint(model), _decoders(engine, tmp_path_factory.mktemp("sampling"))


@pytest.mark.parametrize("method", ["vanilla", "pld", "lookahead", "medusa", "firp", "self_spec", "eagle", "sps"])
def test_sampling_keeps_the_target_distribution(sampling_setup, method):
    engine, joint, decoders = sampling_setup
    counts, multi, long = _sample(decoders[method])
    p = _chi_square_p(counts, joint)
    assert p > ALPHA, f"{method}: chi-square p = {p:.2g}"
    if method != "vanilla":  # the test exercised acceptance, not just plain steps
        assert multi > SAMPLES // 20, f"{method} accepted a draft in only {multi} of {SAMPLES} samples"
    if method in ("pld", "sps", "self_spec"):  # chain methods: chains of 3 drafts were verified, not only 1
        assert long > SAMPLES // 20, f"{method} verified a chain of 3+ drafts in only {long} of {SAMPLES} samples"


@pytest.mark.parametrize("method", ["pld", "medusa", "sps"])
def test_biased_acceptance_fails_the_distribution_test(sampling_setup, method, monkeypatch):
    """Negative control: accepting a draft whenever the target gives it >= 10% must be caught
    (a chain of point masses, a tree, and sampled drafts with their q)."""
    import methods.core.verify as verify

    engine, joint, decoders = sampling_setup
    monkeypatch.setattr(verify, "acceptance_probs",
                        lambda p_parent, rejected, duplicate, q: (p_parent >= 0.1).float())
    counts, _, _ = _sample(decoders[method])
    assert _chi_square_p(counts, joint) < ALPHA


def _sample_under_load(decoder: Decoder, concurrency: int = 4) -> tuple[Counter, int]:
    """``_sample`` with the samples served ``concurrency`` at a time (``methods.core.batch.serve``):
    each request draws from its own seeded generator while its steps share batched passes."""
    from methods.core.batch import Request, serve

    run = serve(decoder, [Request(PROMPT, GenConfig(NEW, temperature=TEMPERATURE, seed=seed))
                          for seed in range(SAMPLES)], concurrency, adapt=False)
    gens = [s.generation for s in run.served]
    assert max(run.batch_sizes) == concurrency
    return Counter(tuple(g.tokens[:NEW]) for g in gens), sum(any(a > 1 for a in g.accepted[1:]) for g in gens)


@pytest.mark.parametrize("method", ["vanilla", "pld", "lookahead", "medusa", "firp", "self_spec", "eagle", "sps"])
def test_sampling_under_load_keeps_the_target_distribution(sampling_setup, method):
    engine, joint, decoders = sampling_setup
    counts, multi = _sample_under_load(decoders[method])
    p = _chi_square_p(counts, joint)
    assert p > ALPHA, f"{method} at concurrency 4: chi-square p = {p:.2g}"
    if method != "vanilla":
        assert multi > SAMPLES // 20, f"{method} accepted a draft in only {multi} of {SAMPLES} samples"


@pytest.mark.parametrize("method", ["pld", "medusa", "sps"])
def test_biased_acceptance_under_load_fails_the_distribution_test(sampling_setup, method, monkeypatch):
    """The negative control at concurrency 4: the batched loop verifies with the same rule."""
    import methods.core.verify as verify

    engine, joint, decoders = sampling_setup
    monkeypatch.setattr(verify, "acceptance_probs",
                        lambda p_parent, rejected, duplicate, q: (p_parent >= 0.1).float())
    counts, _ = _sample_under_load(decoders[method])
    assert _chi_square_p(counts, joint) < ALPHA
