"""``python -m harness train METHOD``: shared set-up, then the method's own trainer."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from harness.errors import UserError
from harness.training.common import TrainConfig

TRAINERS = {"medusa": "harness.training.medusa", "firp": "harness.training.firp"}


def train(config: TrainConfig) -> dict:
    if config.method not in TRAINERS:
        raise UserError(f"no trainer for method {config.method!r}; trainable methods: {', '.join(TRAINERS)}")
    if not config.data:
        raise UserError("--data needs at least one training file (e.g. ../shared/data/gsm8k/train.jsonl)")
    if not config.out:
        raise UserError("--out DIR is required: where the trained weights go")
    from harness.distill import load_prompts, self_distilled_sequences
    from harness.models import check_model_name, load_model
    from harness.training.common import prepare_out

    check_model_name(config.model)
    files = [Path(f) for f in config.data]
    load_prompts(files, limit=1, seed=config.seed, allow_eval=config.allow_eval_data)  # validate files first
    prepare_out(config.out)
    trainer = importlib.import_module(TRAINERS[config.method])
    model, tokenizer = load_model(config.model, device="cpu", dtype=config.dtype)
    data = self_distilled_sequences(model, tokenizer, config.model, files, limit=config.limit, seed=config.seed,
                                    max_new_tokens=config.max_new_tokens, allow_eval=config.allow_eval_data)
    if len(data) < 4:
        raise UserError(f"only {len(data)} training sequences; give more data (--limit, --data)")
    answer_tokens = sum(len(d["ids"]) - d["prompt_len"] for d in data)
    print(f"{len(data)} self-distilled sequences, {answer_tokens} answer tokens", file=sys.stderr)
    data_key = f"{config.model}|{config.dtype}|{[str(f.resolve()) for f in files]}|{config.limit}|" \
               f"{config.seed}|{config.max_new_tokens}"
    return trainer.train(config, model, tokenizer, data, data_key)
