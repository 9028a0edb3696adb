"""Self-distillation resumes where it stopped: an interrupted run and a resumed one equal an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from harness.distill import generate_continuations


class Interrupt(Exception):
    pass


def tiny_setup():
    """A one-layer random Llama with the real tokenizer, six prompts and small generation settings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from harness.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    prompts = [f"question number {i}: what is {i} plus {i}?" for i in range(6)]
    kw = dict(max_new_tokens=5, batch_size=2, max_prompt_tokens=200, stop_ids=[tokenizer.eos_token_id])
    return model, tokenizer, prompts, kw


def test_distillation_resumes_after_an_interruption(tmp_path):
    model, tokenizer, prompts, kw = tiny_setup()
    whole = generate_continuations(model, tokenizer, prompts, **kw)

    partial = tmp_path / "distill.partial.pt"
    real = model.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt
        return real(*args, **kwargs)

    model.generate = flaky
    with pytest.raises(Interrupt):
        generate_continuations(model, tokenizer, prompts, partial=partial, **kw)
    assert torch.load(partial)["next_batch"] == 1
    calls["n"] = 10  # from now on the wrapper only counts
    resumed = generate_continuations(model, tokenizer, prompts, partial=partial, **kw)
    assert resumed == whole
    assert calls["n"] == 12  # only the two batches that were not saved ran again


def test_distillation_reuses_answers_generated_before(tmp_path, monkeypatch):
    """A larger data set pays only for its new prompts: answers of an earlier distillation with
    the same generation settings are reused, from the per-prompt answer cache."""
    from harness.distill import AnswerCache

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path))
    model, tokenizer, prompts, kw = tiny_setup()
    first = generate_continuations(model, tokenizer, prompts[:4], **kw)
    cache = AnswerCache("tiny", {"max_new_tokens": 5})
    cache.add(first)
    assert AnswerCache("tiny", {"max_new_tokens": 6}).load() == {}  # other settings, other answers
    real, calls = model.generate, []

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(*args, **kwargs)

    model.generate = counting
    grown = generate_continuations(model, tokenizer, prompts, known=cache.load(), **kw)
    assert calls == [2]  # one batch: the two new prompts
    whole = generate_continuations(model, tokenizer, prompts, **kw)
    key = lambda d: tuple(d["ids"])  # noqa: E731
    assert sorted(grown, key=key) == sorted(whole, key=key)


def test_self_written_prompts_are_distinct_cached_and_resume(tmp_path, monkeypatch):
    """The model's own requests: deduplicated, saved after every batch, and a rerun continues
    from the cache instead of starting over (a long distillation spans sessions)."""
    from harness import distill

    model, tokenizer, _, _ = tiny_setup()
    # every third request is too short and every fourth repeats an earlier one: both are dropped
    words = iter("too short" if i % 3 == 0 else f"please tell me about topic number {i - i % 4} in detail"
                 for i in range(1000))
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: next(words))
    real = model.generate

    def ending(*args, **kwargs):  # a random tiny model rarely stops: end every answer after a few tokens
        out = real(*args, **kwargs)
        out[:, -1] = tokenizer.eos_token_id
        return out

    model.generate = ending
    cache = tmp_path / "prompts.json"
    first = distill.self_written_prompts(model, tokenizer, 5, seed=0, cache=cache, batch_size=4, max_new_tokens=4)
    assert len(first) == 5 and len(set(first)) == 5
    assert all(len(p) >= 20 for p in first)
    saved = json.loads(cache.read_text())
    assert saved["batches"] >= 2 and saved["prompts"][:5] == first
    model.generate = lambda *a, **k: pytest.fail("regenerated what the cache holds")
    assert distill.self_written_prompts(model, tokenizer, 5, seed=0, cache=cache, batch_size=4) == first


def test_summary_requests_cover_distinct_passages_with_the_templates(tmp_path):
    """Each request wraps one distinct passage (duplicates and rows without one are skipped) in
    one of the instructions; the choice is seeded; files without passages are a user error."""
    from harness.distill import SUMMARY_TEMPLATES, summary_requests
    from methods.core.errors import UserError

    rows = [{"question": "q", "passage": f"Passage number {i % 5} says something."} for i in range(10)]
    rows.append({"question": "a maths question without a passage"})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = summary_requests([path], 4, seed=0)
    assert len(got) == 4
    passages = [next(f"Passage number {i} says something." for i in range(5) if f"number {i} " in g) for g in got]
    assert len(set(passages)) == 4
    prefixes = [t.split("{passage}")[0] for t in SUMMARY_TEMPLATES]
    for text, passage in zip(got, passages):
        assert any(text == t.format(passage=passage) for t in SUMMARY_TEMPLATES), text
    assert len(summary_requests([path], 50, seed=0)) == 5  # never more than the distinct passages
    assert summary_requests([path], 4, seed=0) == got
    assert summary_requests([path], 4, seed=1) != got
    assert len({p for p in prefixes}) == len(SUMMARY_TEMPLATES)
    plain = tmp_path / "maths.jsonl"
    plain.write_text(json.dumps({"question": "1+1?"}) + "\n")
    with pytest.raises(UserError, match="passages"):
        summary_requests([plain], 4, seed=0)


def test_bundled_distillation_carries_to_a_new_machine(tmp_path, monkeypatch):
    """What one machine distilled, bundled, is what the next machine reads: its answers are reused
    without generating, its self-written requests continue from where they stopped, and the bundle
    holds model output only (no prompt of a data file, as text or as ids)."""
    import gzip

    from harness import distill

    model, tokenizer, prompts, kw = tiny_setup()
    bundle_dir = tmp_path / "bundle"
    monkeypatch.setattr(distill, "BUNDLE_DIR", bundle_dir)
    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "first"))
    settings = {"max_new_tokens": 5, "dtype": "torch.float32"}
    store = distill.AnswerCache("tiny", settings)
    first = generate_continuations(model, tokenizer, prompts, known=store.load(), on_batch=store.add, **kw)
    assert len(store.load()) == len(first)  # stored batch by batch, not only at the end
    real = model.generate

    def ending(*args, **kwargs):
        out = real(*args, **kwargs)
        out[:, -1] = tokenizer.eos_token_id
        return out

    words = iter(f"please tell me about topic number {i} in some detail" for i in range(1000))
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **k: next(words))
    model.generate = ending
    identity = {"model": "tiny", "seed": 0, "dtype": "torch.float32"}
    written = distill.self_written_prompts(model, tokenizer, 3, seed=0, cache=tmp_path / "first" / "distill" /
                                           "tiny-x.self-prompts.json", batch_size=2, max_new_tokens=4,
                                           identity=identity)
    wrote = distill.bundle_local_cache()
    assert len(wrote) == 2
    with gzip.open(store.bundle, "rt") as f:
        text = f.read()
    assert "question number" not in text and json.dumps(first[0]["ids"][:first[0]["prompt_len"]])[1:-1] not in text

    monkeypatch.setenv("SPECDEC_HARNESS_CACHE", str(tmp_path / "second"))  # a new machine: empty cache
    model.generate = lambda *a, **k: pytest.fail("regenerated what the bundle holds")
    again = generate_continuations(model, tokenizer, prompts, known=distill.AnswerCache("tiny", settings).load(), **kw)
    key = lambda d: tuple(d["ids"])  # noqa: E731
    assert sorted(again, key=key) == sorted(first, key=key)
    bundled = distill.self_prompts_bundle("tiny", seed=0, dtype="torch.float32")
    assert distill.self_written_prompts(model, tokenizer, 3, seed=0, cache=tmp_path / "second" / "w.json",
                                        batch_size=2, bundle=bundled) == written
    model.generate = ending  # asking for more continues the bundled stream
    more = distill.self_written_prompts(model, tokenizer, 5, seed=0, cache=tmp_path / "second" / "w.json",
                                        batch_size=2, max_new_tokens=4, bundle=bundled)
    assert more[:3] == written and len(more) == 5
