"""Self-distillation resumes where it stopped: an interrupted run and a resumed one equal an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from harness.distill import generate_continuations


class Interrupt(Exception):
    pass


def test_distillation_resumes_after_an_interruption(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from harness.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    prompts = [f"question number {i}: what is {i} plus {i}?" for i in range(6)]
    kw = dict(max_new_tokens=5, batch_size=2, max_prompt_tokens=200, stop_ids=[tokenizer.eos_token_id])
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
