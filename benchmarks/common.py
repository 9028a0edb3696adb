"""What the benchmark scripts share: a model by name (real, or randomly initialised in a known
shape, for machines without the default model's file) and prompts as token ids."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
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


def random_weights(model: Any, folder: Path) -> dict[str, dict[str, str]]:
    """Option overrides giving every trained method weights for a randomly initialised model:
    Medusa heads zero-initialised, FIRP maps identity, self_spec a fixed skip set."""
    from safetensors.torch import save_file

    from methods.firp import FirpMaps
    from methods.medusa import MedusaHeads

    cfg = model.config
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, 3, "shared")
    (folder / "medusa").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in heads.upstream_state_dict().items()}, str(folder / "medusa" / "heads.safetensors"))
    (folder / "medusa" / "config.json").write_text(json.dumps({"default_tree": "4x2x1"}))
    layer = cfg.num_hidden_layers // 3
    maps = FirpMaps(cfg.hidden_size, [layer] * 3)
    (folder / "firp").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in maps.state_dict().items()}, str(folder / "firp" / "firp.safetensors"))
    (folder / "firp" / "config.json").write_text(json.dumps({**maps.config(), "default_tree": "3x2x1"}))
    n = cfg.num_hidden_layers
    skip = {"attention": [], "mlp": [i for i in range(n // 2, n - 1) if i % 2 == 0]}
    return {"medusa": {"heads": str(folder / "medusa")}, "firp": {"weights": str(folder / "firp")},
            "self_spec": {"skip": json.dumps(skip)}}


def method_options(model: Any, tokenizer: Any, model_arg: str) -> tuple[dict[str, dict[str, str]], str]:
    """(option overrides per method, the model name decoders look their shipped weights up by).

    A real model gets no overrides and its own name. A random one (no tokenizer) gets random
    weights in a temporary folder and no name, so no method loads weights trained for another model."""
    if tokenizer is not None:
        return {}, model_arg
    return random_weights(model, Path(tempfile.mkdtemp())), ""


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
