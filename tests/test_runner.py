"""The runner's timing discipline, with scripted decoders and clock: no model needed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import harness.runner as runner
from harness.runner import ShardSettings, median_round, run_shard
from harness.config import RunConfig
from methods.core.decoder import Generation
from tasks.base import Example


CLOCK: list[float] = []  # the seconds of the latest scripted call


class Scripted:
    """A decoder whose n-th call produces ``tokens[n]`` tokens; the clock reads ``seconds[n]``."""

    def __init__(self, name: str, log: list[str], seconds: list[float], tokens: list[int] | None = None) -> None:
        self.name = self.label = name
        self.engine = SimpleNamespace(device=torch.device("cpu"))
        self.log, self.seconds, self.tokens, self.calls = log, seconds, tokens, 0

    def reserve(self, prompt_len: int, limit: int) -> None:
        pass

    def guard_counts(self) -> None:  # no rate guard
        return None

    def generate(self, prompt_ids: list[int], config: Any) -> Generation:
        n = self.tokens[self.calls] if self.tokens else 4
        self.log.append(self.name)
        CLOCK.append(self.seconds[self.calls])
        self.calls += 1
        return Generation(tokens=list(range(n)), accepted=[1] * n)


@pytest.fixture
def scripted_clock(monkeypatch):
    """``timed`` returns the calling decoder's scripted seconds, not the real clock."""
    monkeypatch.setattr(runner, "timed", lambda fn, device: (fn(), CLOCK[-1]))


class Tok:
    def apply_chat_template(self, messages, **kwargs):
        return [1, 2, 3]

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


@pytest.fixture(autouse=True)
def plain_prompts(monkeypatch):
    monkeypatch.setattr(runner, "encode_conversation", lambda tokenizer, messages: [1, 2, 3])


EXAMPLES = [Example(f"e{i}", "chat", ["hi"], task="t") for i in range(2)]


def test_repeats_interleave_rounds_and_keep_the_median_round(scripted_clock):
    log: list[str] = []
    # a: rounds of 4 tokens in 3.0, 1.0, 2.0 s -> median 2.0 s; then 0.5, 0.4, 0.6 -> 0.5
    a = Scripted("a", log, [3.0, 1.0, 2.0, 0.5, 0.4, 0.6])
    # b: the median is per token: 8 tokens in 2.0 s (0.25/token) sits between 4 in 0.4 and 4 in 2.0
    b = Scripted("b", log, [0.4, 2.0, 2.0, 1.0, 1.0, 1.0], tokens=[4, 8, 4, 4, 4, 4])
    records: list[dict] = []
    run_shard(EXAMPLES, [a, b], Tok(), ShardSettings(4, (), None, repeats=3), records.append)
    # rounds are interleaved, and their method order rotates from round to round
    assert log == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert [(r["example_id"], r["method"]) for r in records] == [("e0", "a"), ("e0", "b"), ("e1", "b"), ("e1", "a")]
    first_a, first_b = records[0], records[1]
    assert first_a["wall_time"] == 2.0 and first_a["repeats"]["wall_times"] == [3.0, 1.0, 2.0]
    assert first_b["wall_time"] == 2.0 and first_b["new_tokens"] == 8  # the whole median round: its tokens too
    assert records[3]["wall_time"] == 0.5


def test_one_round_emits_each_method_as_soon_as_it_finishes(scripted_clock):
    log: list[str] = []
    a, b = Scripted("a", log, [1.0, 1.0]), Scripted("b", log, [1.0, 1.0])
    records: list[dict] = []
    run_shard(EXAMPLES, [a, b], Tok(), ShardSettings(4, (), None),
              lambda r: (records.append(r), log.append(f"emit {r['method']}")))
    assert log == ["a", "emit a", "b", "emit b", "b", "emit b", "a", "emit a"]
    assert all("repeats" not in r for r in records)


def test_repeats_skip_methods_already_done(scripted_clock):
    log: list[str] = []
    a, b = Scripted("a", log, [1.0] * 4), Scripted("b", log, [1.0] * 4)
    records: list[dict] = []
    run_shard(EXAMPLES[:1], [a, b], Tok(), ShardSettings(4, (), None, repeats=2), records.append, done={("t", "e0", "a")})
    assert log == ["b", "b"] and [r["method"] for r in records] == ["b"]


def test_median_round_of_an_even_count_is_the_lower_middle():
    rounds = [{"wall_time": t, "new_tokens": 1} for t in (4.0, 1.0, 3.0, 2.0)]
    assert median_round(rounds)["wall_time"] == 2.0


def test_repeats_change_a_runs_identity_only_when_used():
    """A median of rounds is another measurement, so it may not resume a single-round run; at 1 the
    identity is what it always was, so runs made before the option still resume."""
    assert "repeats" not in RunConfig().identity()
    assert RunConfig(repeats=3).identity()["repeats"] == 3
    assert RunConfig(repeats=3).identity_hash() != RunConfig().identity_hash()


def test_load_changes_a_runs_identity_only_when_given():
    """Without --concurrency and --request-rate the identity (and so the run folder's hash) is the one
    runs had before the flags existed, so they still resume; each flag, when given, makes another run."""
    assert RunConfig().identity_hash() == "edcac570"  # the default run's hash before load settings existed
    assert RunConfig(repeats=3, limit=2, seed=1).identity_hash() == "833b4773"
    assert not {"concurrency", "request_rate"} & set(RunConfig().identity())
    closed = RunConfig(concurrency=[1, 4])
    assert closed.identity()["concurrency"] == [1, 4] and "request_rate" not in closed.identity()
    opened = RunConfig(concurrency=[1, 4], request_rate=2.0)
    assert opened.identity()["request_rate"] == 2.0
    hashes = {RunConfig().identity_hash(), closed.identity_hash(), RunConfig(concurrency=[1, 16]).identity_hash(),
              opened.identity_hash()}
    assert len(hashes) == 4
    spec = opened.decode_spec([])
    assert spec.concurrency == (1, 4) and spec.request_rate == 2.0
    assert RunConfig().decode_spec([]).concurrency is None


@pytest.mark.parametrize("method", ["vanilla", "pld"])
def test_caches_grow_before_the_clock_starts_not_inside_a_timed_call(method):
    """The runner sizes the cache for the generation before timing it: a cache that grew
    inside the first timed call charged that method for the allocation and copy."""
    from methods.core.engine import Engine
    from methods.core.kv_cache import KVCache
    from methods.pld import PromptLookupDecoder
    from methods.vanilla import VanillaDecoder
    from tests.conftest import tiny_model

    engine = Engine(tiny_model("llama"), capacity=4)
    decoder = VanillaDecoder(engine) if method == "vanilla" else PromptLookupDecoder(engine)
    grown: list[int] = []
    real_generate, real_alloc = decoder.generate, KVCache._alloc

    def watched(*args: Any, **kwargs: Any) -> Generation:
        engine.cache._alloc = lambda capacity: (grown.append(capacity), real_alloc(engine.cache, capacity))[1]
        try:
            return real_generate(*args, **kwargs)
        finally:
            del engine.cache._alloc

    decoder.generate = watched
    settings = ShardSettings(24, [], None, 0.0, 1.0, 0)
    record = runner.run_example(decoder, Example("e", "chat", ["hi", "more"], task="t"), Tok(), settings)
    assert record["new_tokens"] == 48 and grown == []


def test_records_carry_each_steps_drafted_depth_and_accepted_drafts():
    """A tree of 3 drafts, 2 deep (two branches under the root, one of them extended), on a model
    that repeats its last token: copies of the root are right, so the deep branch is accepted
    whole. Its depth is 2, not its 3 nodes, and 2 drafts are accepted each step."""
    from methods.core.decoder import Decoder, Draft
    from methods.core.engine import Engine
    from methods.core.tree import TreeLayout
    from tests.conftest import repeating_model

    class TwoDeep(Decoder):
        name = "two_deep"

        def draft(self, root: int, root_t: torch.Tensor, room: int) -> Draft:
            if room < 2:
                return super().draft(root, root_t, room)
            other = (root + 1) % self.engine.model.config.vocab_size  # a sibling the target rejects
            tokens = torch.tensor([root, other, root, root], device=self.engine.device)
            return Draft(tokens, TreeLayout([-1, 0, 0, 2], self.engine))

    engine = Engine(repeating_model(), capacity=64)
    record = runner.run_example(TwoDeep(engine), Example("e", "chat", ["hi"], task="t"), Tok(),
                                ShardSettings(10, [], None))
    turn = record["turns"][0]
    assert turn["draft_sizes"][1:3] == [3, 3] and turn["draft_depths"][1:3] == [2, 2]
    assert turn["accepted_drafts"][1:3] == [2, 2] and turn["accepted"][1:3] == [3, 3]
    assert turn["draft_depths"][0] == turn["accepted_drafts"][0] == 0  # prefill drafts nothing
    assert len(turn["draft_depths"]) == len(turn["accepted_drafts"]) == len(turn["accepted"])
