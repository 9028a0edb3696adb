"""The batched pass and continuous batching: every method under load gives batch-1's token ids.

Prompts of different lengths decode together, more requests than slots, so slots are reused
and each step mixes sequences at different positions, layouts and accepted lengths. The
drafters are the trained ones of tests/drafters.py, and each case requires multi-token steps,
so a batched tree mask, position or KV keep that is wrong shows up as a changed token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.core.batch import BatchEngine, Request, serve
from methods.core.decoder import GenConfig
from methods.core.engine import Engine
from methods.vanilla import VanillaDecoder
from tests.drafters import held_out_prompts, multi_token_share

LENGTHS = [6, 9, 4, 12, 7, 5]


def prompts() -> list[list[int]]:
    return [p[:n] for p, n in zip(held_out_prompts(len(LENGTHS), length=max(LENGTHS)), LENGTHS)]


def check_under_load(decoder, reference, levels=(3, 6), new: int = 24, min_share: float = 0.05) -> None:
    """At every level: the reference decoder's batch-1 token ids, all tokens accounted for, and at
    least ``min_share`` multi-token steps."""
    ps = prompts()
    config = GenConfig(new)
    want = [reference.generate(p, config).tokens for p in ps]
    for level in levels:
        run = serve(decoder, [Request(p, config) for p in ps], level)
        gens = [s.generation for s in run.served]
        assert [g.tokens for g in gens] == want, f"concurrency {level}: tokens differ from batch-1"
        assert all(sum(g.accepted) == len(g.tokens) for g in gens)
        assert max(run.batch_sizes) == level and sum(run.step_accepted) == sum(len(g.tokens) - 1 for g in gens)
        share = multi_token_share(gens)
        assert share >= min_share, f"concurrency {level}: {share:.0%} multi-token steps"


def test_vanilla_and_pld_under_load(tiny):
    from methods.pld import PromptLookupDecoder

    engine = Engine(tiny)
    vanilla = VanillaDecoder(engine)
    check_under_load(vanilla, vanilla, levels=(1, 2, 6), min_share=0.0)
    check_under_load(PromptLookupDecoder(engine, policy="fixed"), vanilla, levels=(1, 3, 6))


def test_tree_methods_under_load(tiny, trained):
    from methods.eagle.decoder import EagleDecoder
    from methods.firp.decoder import FirpDecoder
    from methods.medusa.decoder import MedusaDecoder

    kind = tiny.config.model_type
    engine = Engine(tiny)
    vanilla = VanillaDecoder(engine)
    check_under_load(MedusaDecoder(engine, heads=trained.medusa(kind), tree="4x2x1"), vanilla)
    check_under_load(FirpDecoder(engine, weights=trained.firp(kind, [1, 1, 1]), tree="3x2x1"), vanilla)
    check_under_load(EagleDecoder(engine, head=trained.eagle(kind), depth=3, topk=2, total=6), vanilla)


def test_drafter_and_window_methods_under_load(tiny, tmp_path):
    from methods.lookahead import LookaheadDecoder
    from methods.self_spec.decoder import SelfSpeculativeDecoder
    from methods.sps.decoder import SpsDecoder
    from tests.drafters import confident_model, noisy_copy

    kind = tiny.config.model_type
    engine = Engine(tiny)
    vanilla = VanillaDecoder(engine)
    check_under_load(SpsDecoder(engine, draft=noisy_copy(kind, 0.002, tmp_path / "draft"), gamma=3), vanilla,
                     min_share=0.2)
    check_under_load(LookaheadDecoder(engine, window=3, ngram=3, guesses=3), vanilla)
    confident = Engine(confident_model(kind))
    check_under_load(SelfSpeculativeDecoder(confident, skip={"attention": [1], "mlp": []}, threshold=0.3,
                                            adaptive=False, max_draft=5, policy="always"),
                     VanillaDecoder(confident))


def test_sampling_under_load_follows_each_requests_seed(trained, tmp_path):
    """Sampled: each request draws from its own generator, so under load it gets exactly what the
    same method gives it alone with that seed."""
    from methods.medusa.decoder import MedusaDecoder
    from methods.sps.decoder import SpsDecoder
    from tests.conftest import tiny_model
    from tests.drafters import noisy_copy

    engine = Engine(tiny_model("llama"))
    ps = prompts()
    configs = [GenConfig(20, (), 0.8, 0.95, seed=i) for i in range(len(ps))]
    for decoder in (VanillaDecoder(engine), MedusaDecoder(engine, heads=trained.medusa("llama"), tree="4x2x1"),
                    SpsDecoder(engine, draft=noisy_copy("llama", 0.002, tmp_path / "draft"), gamma=3)):
        want = [decoder.generate(p, c).tokens for p, c in zip(ps, configs)]
        run = serve(decoder, [Request(p, c) for p, c in zip(ps, configs)], 4)
        assert [s.generation.tokens for s in run.served] == want, decoder.name


def test_stop_ids_and_one_token_requests_leave_their_slots():
    from tests.conftest import tiny_model

    engine = Engine(tiny_model("llama"))
    vanilla = VanillaDecoder(engine)
    ps = prompts()
    free = vanilla.generate(ps[0], 12).tokens
    stop = (free[5],)
    requests = [Request(ps[0], GenConfig(12, stop)), Request(ps[1], GenConfig(1)), Request(ps[2], GenConfig(12))]
    run = serve(vanilla, requests, 2)
    assert run.served[0].generation.tokens == vanilla.generate(ps[0], GenConfig(12, stop)).tokens
    assert run.served[0].generation.stopped_by == "eos" and len(run.served[1].generation.tokens) == 1
    assert run.served[2].generation.tokens == vanilla.generate(ps[2], 12).tokens
    for s in run.served:
        assert s.arrival <= s.admitted <= s.first_token <= s.finished


def test_slots_from_continues_each_slots_decoder():
    """A serve given an earlier run continues its slots' decoders, what each learned included,
    and still gives batch-1 token ids; without it every slot starts from the decoder."""
    from tests.conftest import tiny_model

    engine = Engine(tiny_model("llama"))
    vanilla = VanillaDecoder(engine)
    ps = prompts()
    first = serve(vanilla, [Request(p, GenConfig(6)) for p in ps[:2]], 2, adapt=False)
    for i, fork in enumerate(first.forks):
        fork.learned = i  # what a slot's decoder learned over its requests
    second = serve(vanilla, [Request(p, GenConfig(6)) for p in ps[2:]], 2, slots_from=first)
    assert [getattr(f, "learned", None) for f in second.forks] == [0, 1]
    assert second.decoder is first.decoder
    assert [s.generation.tokens for s in second.served] == [vanilla.generate(p, 6).tokens for p in ps[2:]]
    fresh = serve(vanilla, [Request(p, GenConfig(6)) for p in ps[:2]], 2, adapt=False)
    assert [getattr(f, "learned", None) for f in fresh.forks] == [None, None]
    other = serve(vanilla, [Request(p, GenConfig(6)) for p in ps], 3, adapt=False, slots_from=first)
    assert [getattr(f, "learned", None) for f in other.forks] == [None, None, None]  # another level: anew


def test_open_loop_requests_wait_for_their_arrival():
    from tests.conftest import tiny_model

    engine = Engine(tiny_model("llama"))
    vanilla = VanillaDecoder(engine)
    ps = prompts()[:3]
    arrivals = [0.0, 0.05, 0.3]
    run = serve(vanilla, [Request(p, GenConfig(6), a) for p, a in zip(ps, arrivals)], 3)
    for s, a in zip(run.served, arrivals):
        assert s.admitted >= a and s.arrival == a
    assert run.served[2].admitted >= run.served[0].finished  # the first two were done long before 0.3 s


def test_keep_moves_each_slots_accepted_nodes_in_one_gather():
    """``keep`` with a leading run in one slot and scattered nodes in two others: each slot's
    cache holds its accepted nodes' KV, in order, after its old length."""
    from methods.core.verify import Acceptance
    from tests.conftest import tiny_model

    engine = Engine(tiny_model("llama"))
    batch = BatchEngine(engine, 3, 32)
    cache = batch.cache
    cache.keys.copy_(torch.arange(cache.keys.shape[3], dtype=cache.keys.dtype)[None, None, None, :, None]
                     .expand_as(cache.keys))
    cache.keys[:, 1] += 1000
    cache.keys[:, 2] += 2000
    for slot, length in zip(range(3), (3, 5, 4)):
        batch.slots[slot].cache.length = length
    chosen = {0: [0, 1, 2], 1: [0, 2, 5], 2: [0, 3]}
    accs = [Acceptance(nodes, [], torch.tensor(nodes), torch.zeros(1, dtype=torch.long)) for nodes in chosen.values()]
    batch.keep([0, 1, 2], accs)
    for slot, base, offset in ((0, 3, 0), (1, 5, 1000), (2, 4, 2000)):
        nodes = chosen[slot]
        kept = cache.keys[0, slot, 0, base:base + len(nodes), 0].tolist()
        assert kept == [offset + base + n for n in nodes]
        assert batch.slots[slot].cache.length == base + len(nodes)


@pytest.mark.parametrize("level", [0, -2])
def test_concurrency_below_one_is_refused(level):
    from tests.conftest import tiny_model

    with pytest.raises(ValueError, match="concurrency"):
        serve(VanillaDecoder(Engine(tiny_model("llama"))), [Request([1, 2], GenConfig(2))], level)


def test_under_load_fits_methods_to_the_batched_costs(monkeypatch):
    """Inside ``under_load`` a method's setup reads the batched curve and its drafting costs scaled
    by batch x T(1, 1) / T(batch, 1), both from the batched measurement; outside, the
    one-sequence ones. PLD prices one sequence's draft by what it costs the whole batch: under
    a batch where all sequences drafting is cheap but one sequence's draft widens everyone's
    pass, it drafts nothing, where the uniform curve would have it draft."""
    import methods.core.cost as cost
    from methods.pld import PromptLookupDecoder
    from tests.conftest import tiny_model

    sizes = (1, 2, 4, 8, 16)
    single = cost.CostCurve(sizes, (1.0, 1.0, 1.0, 1.0, 1.0), 10.0)
    batched = cost.CostCurve(sizes, (1.0, 1.1, 1.2, 1.4, 1.8), 20.0, lone=(1.0, 1.5, 2.0, 3.0, 5.0), single_ms=8.0)
    monkeypatch.setattr(cost, "_cost_curve", lambda engine, name, folder, batch=1: batched if batch > 1 else single)
    monkeypatch.setattr(cost, "_PINNED", None)
    engine = Engine(tiny_model("llama"))
    with cost.under_load(engine, "", None, 4):
        assert cost.cost_curve(engine, "", None) is batched
        assert cost._named_cost("probe", lambda: 0.5) == pytest.approx(0.5 * 4 * 8.0 / 20.0)
        assert list(cost.slot_cost_curve(engine, "", None).ratios) == pytest.approx([1.0, 3.0, 5.0, 9.0, 17.0])
    assert cost.cost_curve(engine, "", None) is single and cost._named_cost("probe", lambda: 0.5) == 0.5
    assert cost.slot_cost_curve(engine, "", None) is single
    pld = PromptLookupDecoder(engine)
    assert pld.under_load(1) is pld
    loaded = pld.under_load(4)
    assert loaded is not pld and loaded.verify_cost(2) == pytest.approx(3.0) and pld.verify_cost is single
    assert loaded.draft_length() == 0 < pld.draft_length()
    uniform = PromptLookupDecoder(engine)
    uniform.verify_cost = batched  # priced as if every sequence drafted alike, it would draft
    assert uniform.draft_length() > 0


def test_measure_batched_times_one_sequence_drafting_and_alone_in_the_same_rounds(monkeypatch):
    """The batched curve carries, from the same rounds, one sequence's draft in a batch of plain
    ones (``lone``) and one sequence alone; ratios are taken within a round. A pass here costs
    20 ms per token over all its sequences on the measurement's clock (a fake one: what a busy
    machine adds to a real sleep is not the point), so every figure is known exactly."""
    import time
    from types import SimpleNamespace

    import methods.core.cost as cost
    from methods.core.batch import BatchEngine
    from tests.conftest import tiny_model

    now = [0.0]

    def forward(self, slots, drafts):
        now[0] += 0.02 * sum(d.layout.n for d in drafts)

    monkeypatch.setattr(cost, "time", SimpleNamespace(perf_counter=lambda: now[0], process_time=time.process_time))
    monkeypatch.setattr(BatchEngine, "forward", forward)
    engine = Engine(tiny_model("llama"))
    curve = cost.measure_batched(engine, 3, sizes=(1, 2, 4), rounds=3)
    assert curve.ratios == pytest.approx((1.0, 2.0, 4.0))    # every sequence n: 3n tokens
    assert curve.lone == pytest.approx((1.0, 4 / 3, 2.0))    # one sequence n, two plain: n + 2
    assert curve.one_token_ms == pytest.approx(60.0) and curve.single_ms == pytest.approx(20.0)
    again = cost.CostCurve.from_dict(curve.as_dict(), curve.key)
    assert again.lone == pytest.approx(curve.lone, abs=1e-3) and again.single_ms == pytest.approx(curve.single_ms, abs=1e-3)
    # a round the machine ran slow moves both sizes: the ratio within rounds cancels it
    times = {1: [1.0, 1.0, 4.0], 2: [1.5, 6.0, 6.0]}
    assert cost._round_ratios(times, 1, [1, 2]) == [1.0, 1.5]


def test_batched_attention_takes_sdpa_output_in_any_layout(monkeypatch):
    """CUDA's float32 attention kernel returns its output in a strided layout, where the CPU's is
    contiguous; the batched pass gives batch-1's ids whichever layout it gets."""
    from methods.core import batch as batch_module
    from methods.pld import PromptLookupDecoder
    from tests.conftest import tiny_model

    real = F.scaled_dot_product_attention

    def strided(*args, **kwargs):  # the same values, laid out [B, T, H, D] in memory
        return real(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(batch_module.F, "scaled_dot_product_attention", strided)
    engine = Engine(tiny_model("llama"))
    check_under_load(PromptLookupDecoder(engine, policy="fixed"), VanillaDecoder(engine), levels=(3,))
