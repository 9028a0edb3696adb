"""What every ``harness tune <method>`` needs before its search: prompts, model and a timer.

A tuner scores settings on a few *training* prompts (evaluation files are refused by the
toolkit), so these steps, and the refusals a user sees on a bad argument, are the same for
every method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from methods.core.errors import UserError


@dataclass
class TuneSettings:
    """What every tuner takes from ``harness tune``; a tuner subclasses it for its defaults and extras."""

    model: str = "smollm2-135m"
    data: list[str] = field(default_factory=list)
    out: str = "tune.json"
    dtype: str = "auto"
    device: str = "cpu"
    trials: int = 40
    prompts: int = 6
    max_new_tokens: int = 32
    seed: int = 0

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "TuneSettings":
        """The CLI's arguments this tuner knows; an argument left unset keeps the tuner's default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in args.items() if k in known and v is not None})


@dataclass
class TuningBench:
    engine: Any
    stop: list[int]
    prompts: list[list[int]]
    out_path: Path


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("tuning needs optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def prepare(config: Any, toolkit: Any) -> TuningBench:
    """Checks the arguments, reads the training prompts and loads the model (in that order: cheap refusals first)."""
    from methods.core.engine import Engine
    from methods.core.prompts import encode_conversation, stop_token_ids

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
    prompts = [encode_conversation(tokenizer, [{"role": "user", "content": t}])[-320:] for t in texts]
    return TuningBench(Engine(model), stop_token_ids(tokenizer, model), prompts, out_path)


def tokens_per_s(decoder: Any, bench: TuningBench, max_new_tokens: int) -> float:
    """Decoding speed over the tuning prompts, after a short warm-up."""
    from methods.core.timing import synchronize

    decoder.generate(bench.prompts[0], 4, bench.stop)
    synchronize(bench.engine.device)
    start, tokens = time.perf_counter(), 0
    for p in bench.prompts:
        tokens += len(decoder.generate(p, max_new_tokens, bench.stop).tokens)
    synchronize(bench.engine.device)
    return tokens / (time.perf_counter() - start)
