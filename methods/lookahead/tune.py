"""``python -m harness tune lookahead``: fit the window, n-gram size and guesses to the hardware.

Lookahead's pass carries W x (N-1) window tokens and up to G x (N-1) guess tokens beside
the root, so what pays depends on the verify-cost curve t(n)/t(1): where a pass over the
default shape's 31 tokens costs several one-token passes (float32 on a CPU), a smaller
shape wins; where it costs little more than one (bf16 with matrix units, a GPU), a larger
one. The objective is the speedup the cost model predicts from what decoding really did:

    predicted speedup = tokens / sum over steps of t(1 + processed tokens of the step)

with every step's accepted tokens and pass size counted while greedily decoding a few
*training* prompts. It needs no timing, so the search is deterministic and not at the
mercy of a shared machine's drift; the best and the default shape are timed against
vanilla once at the end, for the record. Search: optuna's TPE, starting from the
default, upstream's shape, small shapes for steep curves and large ones for flat curves.

Under greedy decoding a shape's counts (tokens, steps, how many steps fed how many tokens)
do not depend on the machine; only their price does. The result keeps them for every shape
tried (``candidates``), so one file serves every machine in the dtype: shipped as
``methods/lookahead/tuned/<model>-<dtype>.json``, ``lookahead.tuned=auto`` prices each shape on
the measured curve of the machine it runs on and takes the best (``decoder.pick_shape``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from methods.core.training import Toolkit
from methods.core.tuning import TuneSettings

MAX_WINDOW, MAX_NGRAM, MAX_GUESSES = 8, 6, 8
# (W, N, G): the default, upstream's, smaller shapes for a steep cost curve, larger ones for a flat one
PRIORS = [(5, 4, 5), (7, 5, 7), (3, 3, 3), (2, 3, 2), (1, 3, 1), (1, 2, 2), (1, 2, 1), (4, 3, 4), (8, 6, 8)]


@dataclass
class TuneConfig(TuneSettings):
    out: str = "lookahead.json"
    trials: int = 30
    max_new_tokens: int = 64


def predicted_speedup(generations: Sequence[Any], cost: Any) -> dict[str, Any]:
    """Tokens per unit of one-token pass time, the prefill left out (vanilla's is the same), with
    the machine-free counts it is priced from: tokens, steps, and steps per pass size
    (``processed_counts``: tokens fed beyond the root -> steps)."""
    tokens = steps = 0
    spent = processed = 0.0
    counts: dict[str, int] = {}
    for gen in generations:
        accepted, sizes = gen.accepted[1:], gen.processed[1:]
        tokens += sum(accepted)
        steps += len(accepted)
        processed += sum(sizes)
        spent += sum(cost(1 + n) for n in sizes)
        for n in sizes:
            counts[str(n)] = counts.get(str(n), 0) + 1
    if not steps:
        return {"speedup": 0.0, "mean_accepted_length": 0.0, "processed_per_step": 0.0, "tokens": 0, "steps": 0,
                "processed_counts": {}}
    return {"speedup": tokens / spent, "mean_accepted_length": tokens / steps, "processed_per_step": processed / steps,
            "tokens": tokens, "steps": steps, "processed_counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0])))}


def candidate_table(trials: Sequence[Any]) -> list[dict[str, Any]]:
    """Every distinct shape tried, with its counts (``decoder.candidate_speedup`` prices them on any curve)."""
    rows: dict[tuple[int, int, int], dict[str, Any]] = {}
    for t in trials:
        if t.value is None or "processed_counts" not in t.user_attrs:
            continue
        shape = (t.params["window"], t.params["ngram"], t.params["guesses"])
        a = t.user_attrs
        rows[shape] = {"window": shape[0], "ngram": shape[1], "guesses": shape[2], "tokens": a["tokens"],
                       "steps": a["steps"], "mean_accepted_length": round(a["mean_accepted_length"], 4),
                       "processed_per_step": round(a["processed_per_step"], 3),
                       "processed_counts": a["processed_counts"], "predicted_speedup_here": round(t.value, 4)}
    return sorted(rows.values(), key=lambda r: -r["predicted_speedup_here"])


def tune(args: dict[str, Any], toolkit: Toolkit) -> dict[str, Any]:
    """``harness tune lookahead``: ``args`` holds the CLI's model, data, out, dtype, device, trials, ... ."""
    return tune_lookahead(TuneConfig.from_args(args), toolkit)


def tune_lookahead(config: TuneConfig, toolkit: Toolkit) -> dict[str, Any]:
    from methods.core.cost import cost_curve
    from methods.core.tuning import prepare, require_optuna, tokens_per_s
    from methods.lookahead.decoder import LookaheadDecoder
    from methods.vanilla import VanillaDecoder

    optuna = require_optuna()
    bench = prepare(config, toolkit)
    engine, prompts, stop = bench.engine, bench.prompts, bench.stop
    curve = cost_curve(engine, config.model, toolkit.cache_dir)

    def decoder(shape: tuple[int, int, int]) -> LookaheadDecoder:
        W, N, G = shape
        return LookaheadDecoder(engine, window=W, ngram=N, guesses=G, tuned="none", model_name=config.model)

    def predict(shape: tuple[int, int, int]) -> dict[str, float]:
        d = decoder(shape)
        return predicted_speedup([d.generate(p, config.max_new_tokens, stop) for p in prompts], curve)

    def objective(trial: "optuna.Trial") -> float:
        shape = (trial.suggest_int("window", 1, MAX_WINDOW), trial.suggest_int("ngram", 2, MAX_NGRAM),
                 trial.suggest_int("guesses", 1, MAX_GUESSES))
        result = predict(shape)
        for key, value in result.items():
            trial.set_user_attr(key, value)
        return result["speedup"]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))
    for W, N, G in PRIORS:
        study.enqueue_trial({"window": W, "ngram": N, "guesses": G})
    study.optimize(objective, n_trials=max(config.trials, len(PRIORS)), show_progress_bar=True)
    best = study.best_trial
    shape = (best.params["window"], best.params["ngram"], best.params["guesses"])
    default = next(t for t in study.trials if (t.params["window"], t.params["ngram"], t.params["guesses"]) == PRIORS[0])

    speed = lambda d: tokens_per_s(d, bench, config.max_new_tokens)  # noqa: E731
    base = speed(VanillaDecoder(engine))
    measured = {"vanilla_tokens_per_s": round(base, 2), "best": round(speed(decoder(shape)) / base, 3),
                "default": round(speed(decoder(PRIORS[0])) / base, 3)}
    result = {"window": shape[0], "ngram": shape[1], "guesses": shape[2],
              "predicted_speedup": round(best.value, 3),
              "mean_accepted_length": round(best.user_attrs["mean_accepted_length"], 3),
              "processed_per_step": round(best.user_attrs["processed_per_step"], 2),
              "default_shape": dict(zip(("window", "ngram", "guesses"), PRIORS[0])),
              "default_predicted_speedup": round(default.value, 3),
              "measured_speedup_once": measured,
              "cost_curve": curve.as_dict(), "candidates": candidate_table(study.trials),
              "trials": len(study.trials), "prompts": len(prompts),
              "max_new_tokens": config.max_new_tokens, "model": config.model,
              "dtype": str(engine.dtype).replace("torch.", ""),
              "command": "python -m harness tune lookahead " + " ".join(sys.argv[3:])}
    bench.out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best: W={shape[0]} N={shape[1]} G={shape[2]}, predicted {best.value:.2f}x vanilla "
          f"(default 5x4x5: {default.value:.2f}x); measured once {measured['best']:.2f}x "
          f"(default {measured['default']:.2f}x); written to {bench.out_path} with {len(result['candidates'])} "
          f"shapes' counts (ship it as methods/lookahead/tuned/{config.model}-{result['dtype']}.json: every "
          "machine then picks its shape from them)", file=sys.stderr)
    return result
