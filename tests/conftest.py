"""Shared fixtures: tiny random-weight models (unit tests) and the real default model (integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_model(kind: str, seed: int = 0):
    """A 3-layer random model of the given Llama-family type, float32, eval mode. Each kind
    differs where the families do: Mistral attends within a sliding window (8 positions,
    shorter than most test sequences), Qwen2 has biases on q, k and v."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=8))  # shorter than most test sequences
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    return model.eval().requires_grad_(False)


def repeating_model(kind: str = "llama"):
    """A tiny model that repeats its last token: every sublayer's output projection is zero (so a
    hidden state stays its token's embedding) and the LM head is the embedding (a vector's dot
    product with itself beats its dot products with the others). Every draft of "the next
    tokens" that copies the current one is right, so a method that drafts must accept."""
    model = tiny_model(kind)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    return model


@pytest.fixture(scope="session", params=["llama", "mistral", "qwen2"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Drafters trained on each tiny model's own text, once per session (tests/drafters.py)."""
    from tests.drafters import TrainedDrafters

    return TrainedDrafters(tmp_path_factory.mktemp("drafters"))


@pytest.fixture(scope="session")
def smollm():
    """The real default model in float32 (converted once into the user cache)."""
    from harness.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is not present")
    return SHARED_DATA


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the default model's tokenizer, saved as a folder ``--model`` accepts.

    End-to-end runs (``python -m harness run --model DIR``) then take seconds, in subprocesses
    and Ray actors alike, and are deterministic on the CPU in float32.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from harness.models import embedded_model_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m", quiet=True)).save_pretrained(folder)
    return folder
