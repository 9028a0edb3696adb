"""``python -m harness tune self_spec``: search the skip set of self-speculative decoding.

Bayesian optimisation with optuna's TPE sampler over one binary choice per sublayer
(skip attention i? skip MLP i?). The objective is what users care about: decoding
tokens/s of ``self_spec`` on a few *training* prompts, with the candidate skip set. Each
trial is lossless by construction, so only speed is at stake. The first and last layers
are never skipped (the paper's searches rarely pick them, and it halves the search space's
worst corners).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods.core.errors import UserError
from methods.core.training import Toolkit


@dataclass
class TuneConfig:
    model: str = "smollm2-135m"
    data: list[str] = field(default_factory=list)
    out: str = "skip.json"
    dtype: str = "float32"
    device: str = "cpu"
    trials: int = 30
    prompts: int = 6
    max_new_tokens: int = 32
    seed: int = 0


def tune(args: dict[str, Any], toolkit: Toolkit) -> dict[str, Any]:
    """``harness tune self_spec``: ``args`` holds the CLI's model, data, out, dtype, device, trials, ... ."""
    known = {f for f in TuneConfig.__dataclass_fields__}
    return tune_self_spec(TuneConfig(**{k: v for k, v in args.items() if k in known and v is not None}), toolkit)


def tune_self_spec(config: TuneConfig, toolkit: Toolkit) -> dict[str, Any]:
    try:
        import optuna
    except ImportError:
        raise UserError("tuning needs optuna: pip install optuna") from None
    from methods.core.engine import Engine
    from methods.core.prompts import encode_conversation, stop_token_ids
    from methods.core.timing import synchronize
    from methods.self_spec.decoder import SelfSpeculativeDecoder
    from methods.vanilla import VanillaDecoder

    if not config.data:
        raise UserError("--data needs at least one training file (e.g. ../shared/data/gsm8k/train.jsonl)")
    if config.trials <= 0 or config.prompts <= 0 or config.max_new_tokens <= 0:
        raise UserError("--trials, --prompts and --max-new-tokens must be positive integers")
    toolkit.check_model(config.model)
    texts = toolkit.training_prompts([Path(f) for f in config.data], limit=config.prompts, seed=config.seed)
    out_path = Path(config.out)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {out_path}: {exc.strerror}") from None
    model, tokenizer = toolkit.load_model(config.model, device=config.device, dtype=config.dtype)
    engine = Engine(model)
    stop = stop_token_ids(tokenizer, model)
    prompts = [encode_conversation(tokenizer, [{"role": "user", "content": t}])[-320:] for t in texts]

    def tokens_per_s(decoder) -> float:
        decoder.generate(prompts[0], 4, stop)  # warm-up
        synchronize(engine.device)
        start, tokens = time.perf_counter(), 0
        for p in prompts:
            tokens += len(decoder.generate(p, config.max_new_tokens, stop).tokens)
        synchronize(engine.device)
        return tokens / (time.perf_counter() - start)

    vanilla_tps = tokens_per_s(VanillaDecoder(engine))
    print(f"vanilla: {vanilla_tps:.1f} tokens/s on {len(prompts)} training prompts", file=sys.stderr)

    n_layers = engine.num_layers

    def tokens_per_s(decoder) -> float:
        decoder.generate(prompts[0], 4, stop)  # warm-up
        start, tokens = time.perf_counter(), 0
        for p in prompts:
            tokens += len(decoder.generate(p, config.max_new_tokens, stop).tokens)
        return tokens / (time.perf_counter() - start)

    vanilla_tps = tokens_per_s(VanillaDecoder(engine))
    print(f"vanilla: {vanilla_tps:.1f} tokens/s on {len(prompts)} training prompts", file=sys.stderr)

    def objective(trial: "optuna.Trial") -> float:
        skip = {"attention": [i for i in range(1, n_layers - 1) if trial.suggest_int(f"attn{i}", 0, 1)],
                "mlp": [i for i in range(1, n_layers - 1) if trial.suggest_int(f"mlp{i}", 0, 1)]}
        tps = tokens_per_s(SelfSpeculativeDecoder(engine, skip=skip))
        trial.set_user_attr("skip", skip)
        return tps

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
    # A sensible first guess (skip every other layer's MLP in the upper half) seeds the model of the objective.
    study.enqueue_trial({**{f"attn{i}": 0 for i in range(1, n_layers - 1)},
                         **{f"mlp{i}": int(i >= n_layers // 2 and i % 2 == 0) for i in range(1, n_layers - 1)}})
    study.optimize(objective, n_trials=config.trials, show_progress_bar=True)
    best = study.best_trial
    result = {**best.user_attrs["skip"], "tokens_per_s": round(best.value, 2),
              "vanilla_tokens_per_s": round(vanilla_tps, 2), "speedup": round(best.value / vanilla_tps, 3),
              "trials": config.trials, "model": config.model, "dtype": config.dtype,
              "command": "python -m harness tune self_spec " + " ".join(sys.argv[3:])}
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best: {best.value:.1f} tokens/s ({result['speedup']:.2f}x vanilla); skip set written to {out_path}",
          file=sys.stderr)
    return result
