"""``python -m harness train|tune|analyze METHOD``: shared set-up, then the method's own entry point.

The harness owns model loading and the self-distilled data; the method's folder owns the
training, tuning or analysis itself, found through its registry spec.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from base.errors import UserError
from methods.core.training import Toolkit, TrainConfig, data_key, prepare_out
import torch

from methods.registry import get_spec, methods_with


def toolkit(device: str = "cpu") -> Toolkit:
    from harness.distill import held_out_prompts, load_prompts, prompt_sequences, self_distilled_sequences
    from harness.models import cache_root, check_model_name, load_model, resolve_dtype

    return Toolkit(cache_dir=cache_root(), load_model=load_model, training_prompts=load_prompts,
                   training_sequences=self_distilled_sequences, check_model=check_model_name, device=device,
                   resolve_dtype=lambda name, dev: resolve_dtype(name, torch.device(dev)),
                   held_out_prompts=held_out_prompts, prompt_sequences=prompt_sequences)


def entry_point(kind: str, method: str):
    verb = {"train": "trainable", "tune": "tunable", "analyze": "analyzable"}[kind]
    fn = get_spec(method).entry(kind)
    if fn is None:
        raise UserError(f"nothing to {kind} for method {method!r}; {verb} methods: "
                        f"{', '.join(methods_with(kind)) or 'none'}")
    return fn


def train(config: TrainConfig, device: str = "cpu") -> dict[str, Any]:
    trainer = entry_point("train", config.method)
    if not config.data:
        raise UserError("--data needs at least one training file (e.g. ../shared/data/gsm8k/train.jsonl)")
    if not config.out:
        raise UserError("--out DIR is required: where the trained weights go")
    tools = toolkit(device)
    tools.check_model(config.model)
    files = [Path(f) for f in config.data]
    tools.training_prompts(files, limit=1, seed=config.seed, allow_eval=config.allow_eval_data)  # validate files first
    prepare_out(config.out)
    model, tokenizer = tools.load_model(config.model, device=device, dtype=config.dtype)
    data = tools.training_sequences(model, tokenizer, config.model, files, limit=config.limit, seed=config.seed,
                                    max_new_tokens=config.max_new_tokens, allow_eval=config.allow_eval_data,
                                    **({"self_prompts": config.self_prompts} if config.self_prompts else {}),
                                    **({"summary_prompts": config.summary_prompts} if config.summary_prompts else {}))
    if len(data) < 4:
        raise UserError(f"only {len(data)} training sequences; give more data (--limit, --data)")
    answer_tokens = sum(len(d["ids"]) - d["prompt_len"] for d in data)
    print(f"{len(data)} self-distilled sequences, {answer_tokens} answer tokens", file=sys.stderr)
    key = data_key(config)
    return trainer(config, model, tokenizer, data, key, tools)


def run_entry(kind: str, method: str, args: dict[str, Any]) -> Any:
    """``tune`` / ``analyze``: the method's entry point with the CLI's arguments and the toolkit."""
    fn = entry_point(kind, method)
    return fn(args, toolkit(args.get("device", "cpu")))
