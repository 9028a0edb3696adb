"""``python -m harness tune self_spec``: search the skip set of self-speculative decoding.

Bayesian optimisation with optuna's TPE sampler. The objective is what users care about:
decoding tokens/s of ``self_spec`` (drafting every step, ``policy=always``, so a poor set
shows as slow instead of being hidden by the cost policy) on a few *training* prompts.
Each trial is lossless by construction, so only speed is at stake. The first and last
layers are never skipped.

Two search spaces (``--space``):

* ``blocks`` (default): one contiguous block of skipped attention sublayers and one of
  skipped MLP sublayers, four integers instead of 2(L-2) bits. Skipping neighbouring
  sublayers disturbs the residual stream less than scattered ones, and Draft & Verify's
  searches on LLaMA-2 skipped attention more often than MLP; the first trials are those
  priors (attention blocks in the upper layers, then attention with a shorter MLP block),
  so TPE starts from sensible points and the budget is spent near them.
* ``free``: one bit per sublayer, as the paper searches (more trials needed).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from methods.core.errors import UserError
from methods.core.training import Toolkit
from methods.core.tuning import TuneSettings


@dataclass
class TuneConfig(TuneSettings):
    out: str = "skip.json"
    space: str = "blocks"
    draft: int = 4


def _block(first: int, length: int, last: int) -> list[int]:
    return list(range(first, min(first + length, last + 1)))


def blocks_space(n_layers: int) -> tuple[Callable[[Any], dict[str, list[int]]], list[dict[str, int]]]:
    """One contiguous attention block and one MLP block inside layers 1..L-2, and the priors."""
    last = n_layers - 2

    def suggest(trial: Any) -> dict[str, list[int]]:
        return {"attention": _block(trial.suggest_int("attn_first", 1, last), trial.suggest_int("attn_len", 0, last), last),
                "mlp": _block(trial.suggest_int("mlp_first", 1, last), trial.suggest_int("mlp_len", 0, last), last)}

    half, third, quarter = n_layers // 2, n_layers // 3, n_layers // 4
    priors = [  # attention in the upper layers first, then attention with a shorter MLP block on top
        {"attn_first": half, "attn_len": last - half + 1, "mlp_first": last, "mlp_len": 0},
        {"attn_first": third, "attn_len": last - third + 1, "mlp_first": last, "mlp_len": 0},
        {"attn_first": quarter, "attn_len": last - quarter + 1, "mlp_first": last, "mlp_len": 0},
        {"attn_first": third, "attn_len": last - third + 1, "mlp_first": last - quarter + 1, "mlp_len": quarter},
        {"attn_first": half, "attn_len": last - half + 1, "mlp_first": half, "mlp_len": quarter},
    ]
    # a shallow model squeezes the priors into the search ranges (optuna ignores out-of-range fixed values)
    priors = [{k: min(max(v, 0 if k.endswith("_len") else 1), last) for k, v in p.items()} for p in priors]
    return suggest, priors


def free_space(n_layers: int) -> tuple[Callable[[Any], dict[str, list[int]]], list[dict[str, int]]]:
    """One bit per sublayer (the paper's space); the prior skips attention in the upper half."""
    inner = range(1, n_layers - 1)

    def suggest(trial: Any) -> dict[str, list[int]]:
        return {"attention": [i for i in inner if trial.suggest_int(f"attn{i}", 0, 1)],
                "mlp": [i for i in inner if trial.suggest_int(f"mlp{i}", 0, 1)]}

    return suggest, [{**{f"attn{i}": int(i >= n_layers // 2) for i in inner}, **{f"mlp{i}": 0 for i in inner}}]


SPACES = {"blocks": blocks_space, "free": free_space}


def tune(args: dict[str, Any], toolkit: Toolkit) -> dict[str, Any]:
    """``harness tune self_spec``: ``args`` holds the CLI's model, data, out, dtype, device, trials, ... ."""
    return tune_self_spec(TuneConfig.from_args(args), toolkit)


def tune_self_spec(config: TuneConfig, toolkit: Toolkit) -> dict[str, Any]:
    from methods.core.tuning import prepare, require_optuna, tokens_per_s
    from methods.self_spec.decoder import SelfSpeculativeDecoder
    from methods.vanilla import VanillaDecoder

    optuna = require_optuna()
    if config.space not in SPACES:
        raise UserError(f"unknown --space {config.space!r}; valid: {', '.join(SPACES)}")
    if config.draft <= 0:
        raise UserError("--draft must be a positive integer")
    bench = prepare(config, toolkit)
    engine, out_path, prompts = bench.engine, bench.out_path, bench.prompts
    speed = lambda decoder: tokens_per_s(decoder, bench, config.max_new_tokens)  # noqa: E731

    def drafter(skip: Any) -> SelfSpeculativeDecoder:
        # every step drafts exactly ``config.draft`` tokens: with the adaptive exit a draft that is
        # cheap but wrong exits at once and scores near vanilla's speed while accepting nothing, so
        # a fixed length makes a useless draft pay for itself and leaves accuracy per cost as what
        # the search climbs
        return SelfSpeculativeDecoder(engine, skip=skip, policy="always", threshold=0.0, adaptive=False,
                                      max_draft=config.draft)

    vanilla_tps = speed(VanillaDecoder(engine))
    print(f"vanilla: {vanilla_tps:.1f} tokens/s on {len(prompts)} training prompts", file=sys.stderr)
    shipped = SelfSpeculativeDecoder.weights.shipped(config.model)
    shipped_tps = speed(drafter(str(shipped))) if shipped else None
    if shipped_tps:
        print(f"shipped skip set: {shipped_tps:.1f} tokens/s ({shipped_tps / vanilla_tps:.2f}x)", file=sys.stderr)
    n_layers = engine.num_layers
    suggest, priors = SPACES[config.space](n_layers)

    def objective(trial: "optuna.Trial") -> float:
        skip = suggest(trial)
        if not skip["attention"] and not skip["mlp"]:
            return 0.0  # the full model as its own draft: every draft token costs a whole step
        tps = speed(drafter(skip))
        trial.set_user_attr("skip", skip)
        return tps

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
    for prior in priors:
        study.enqueue_trial(prior)
    study.optimize(objective, n_trials=config.trials, show_progress_bar=True)
    best = study.best_trial
    result = {**best.user_attrs["skip"], "tokens_per_s": round(best.value, 2),
              "vanilla_tokens_per_s": round(vanilla_tps, 2), "speedup": round(best.value / vanilla_tps, 3),
              **({"shipped_speedup": round(shipped_tps / vanilla_tps, 3)} if shipped_tps else {}),
              "trials": config.trials, "space": config.space, "draft_tokens": config.draft, "model": config.model, "dtype": str(engine.dtype).replace("torch.", ""),
              "command": "python -m harness tune self_spec " + " ".join(sys.argv[3:])}
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best: {best.value:.1f} tokens/s ({result['speedup']:.2f}x vanilla); skip set written to {out_path}",
          file=sys.stderr)
    return result
