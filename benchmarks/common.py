"""What the benchmark scripts share: a model by name (real, or randomly initialised in a known
shape, for machines without the default model's file) and prompts as token ids."""

from __future__ import annotations

import argparse
from typing import Any

import torch

# Shapes of real models, for speed and memory runs with random weights (acceptance means nothing there).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                     rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m",
                    help="embedded name, HF folder, or random:SHAPE with SHAPE in " + ", ".join(SHAPES))
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


def load_bench_model(name: str, device: str, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer or None); ``random:SHAPE`` builds the shape from its config with seeded random weights."""
    if name.startswith("random:"):
        from transformers import LlamaConfig, LlamaForCausalLM

        from harness.models import resolve_device, resolve_dtype

        dev = resolve_device(device)
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[name.split(":", 1)[1]], attn_implementation="sdpa")
        with torch.device(dev):
            model = LlamaForCausalLM(config)
        model.to(resolve_dtype(dtype, dev)).eval().requires_grad_(False)
        return model, None
    from harness.models import load_model

    return load_model(name, device=device, dtype=dtype)


def prompt_ids(tokenizer: Any, count: int, vocab: int, length: int = 120) -> list[list[int]]:
    """The built-in prompts through the chat template, or seeded random ids for a random model."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(count)]
    from methods.core.prompts import encode_conversation
    from tasks.builtin import _PROMPTS

    return [encode_conversation(tokenizer, [{"role": "user", "content": p}]) for _, p, _ in _PROMPTS[:count]]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
