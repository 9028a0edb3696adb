"""Speculative decoding under load: every method's throughput and speedup at each concurrency level.

    python benchmarks/load.py [--methods vanilla,pld,firp,...] [--levels 1,2,4,8,16] [--requests 32]
                              [--new 64] [--tasks builtin | --tasks mt_bench,gsm8k --data-dir ../shared/data]
                              [--model random:llama-1b --device cuda] [--dtype auto] [--fixed]

At each level the same requests (the first turn of each selected example, repeated in order
where there are fewer examples than requests) go through ``methods.core.batch.serve`` with
that many in flight (a closed loop). The requests are cut into chunks (``--chunk``, default
one batch: as many requests as the level) and the methods take turns chunk by chunk, the
order rotating, so a machine whose speed drifts over seconds shifts every method alike; each
slot's decoder goes on from one chunk to the next (``serve(slots_from=...)``), as a server's
slots do. A method's throughput is its output tokens over its serving time, summed over its
chunks; its speedup is the geometric mean, over chunks, of its throughput over vanilla's on
the same chunk, served a few seconds apart, which cancels more of the drift than a ratio of
sums: equal work, since both served the same requests. Each (method, level) gets an
uncounted warm-up first. With ``--rounds R`` all of it runs R times and the round with the
median speedup is kept. Each method's drafting is refitted to the level's batch (``Decoder.under_load``) unless
``--fixed``. It prints one table per level, then for every method the first level where its
speedup falls under 1.05x, and vanilla's throughput at each level over its throughput at
the first.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys

import torch
from common import add_model_args, load_bench_model, method_options, prompt_ids

from methods.core.batch import Request, serve
from methods.core.decoder import GenConfig
from methods.core.engine import Engine
from methods.registry import get_spec

PAYS = 1.05  # a speedup under this is reported as "stops paying"


def requests_for(args: argparse.Namespace, tokenizer, vocab: int) -> list[list[int]]:
    """Prompt ids for ``args.requests`` requests: the tasks' first turns (or random ids for a random model)."""
    if tokenizer is None:
        return prompt_ids(None, args.requests, vocab)
    from harness.config import RunConfig
    from harness.session import load_examples
    from methods.core.prompts import encode_conversation

    examples, _ = load_examples(RunConfig(tasks=args.tasks.split(","), data_dir=args.data_dir,
                                          limit=args.limit))
    prompts = [encode_conversation(tokenizer, [{"role": "user", "content": e.turns[0]}]) for e in examples]
    prompts = [p for p in prompts if len(p) <= args.max_prompt]
    if not prompts:
        sys.exit(f"no prompt of the selected tasks has at most {args.max_prompt} tokens")
    return [prompts[i % len(prompts)] for i in range(args.requests)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--methods", default="vanilla,pld,lookahead,medusa,firp,eagle,sps,self_spec")
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per (method, level): the same for all")
    ap.add_argument("--new", type=int, default=64, help="new tokens per request")
    ap.add_argument("--tasks", default="builtin")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=None, help="examples per task")
    ap.add_argument("--max-prompt", type=int, default=400, help="longest prompt, in tokens, to send")
    ap.add_argument("--fixed", action="store_true", help="keep each method's batch-1 drafting at every level")
    ap.add_argument("--chunk", type=int, default=0,
                    help="requests per serve, methods alternating chunk by chunk (default: the level)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="serves per (method, level), the method order rotating each round; the median kept")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if min(levels) < 1 or args.requests < max(levels):
        sys.exit(f"--levels must be positive and --requests ({args.requests}) at least the largest level")

    model, tok = load_bench_model(args.model, args.device, args.dtype)
    engine = Engine(model)
    overrides, model_name = method_options(model, tok, args.model)
    names = args.methods.split(",")
    if "vanilla" not in names:
        names.insert(0, "vanilla")
    decoders = {}
    for name in names:
        spec = get_spec(name)
        try:
            decoders[name] = spec.decoder(engine, model_name=model_name, **overrides.get(name, {}))
        except Exception as exc:  # a method without weights for this model: said, and left out
            print(f"skipping {name}: {exc}", file=sys.stderr)
    prompts = requests_for(args, tok, model.config.vocab_size)
    config = GenConfig(args.new)
    cpu = platform.processor() or platform.machine()
    print(f"{args.model} on {engine.device} ({str(engine.dtype).removeprefix('torch.')}, {torch.get_num_threads()} "
          f"threads, {cpu}); {args.requests} requests x {args.new} new tokens per (method, level); "
          f"drafting {'fixed at batch 1' if args.fixed else 'refitted per level'}")
    results: dict[tuple[str, int], dict[str, float]] = {}
    for li, level in enumerate(levels):
        fitted = {name: decoder if args.fixed else decoder.under_load(level) for name, decoder in decoders.items()}
        for name, decoder in fitted.items():  # uncounted: every shape of the level's passes once
            serve(decoder, [Request(p, GenConfig(8)) for p in prompts[:level]], level, adapt=False)
        size = args.chunk or level
        chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        rounds: dict[str, list[dict[str, float]]] = {}
        for r in range(args.rounds):
            runs: dict[str, list] = {name: [] for name in fitted}
            for c, chunk in enumerate(chunks):  # methods alternate chunk by chunk, the order rotating
                shift = (li + r + c) % len(names)
                for name in names[shift:] + names[:shift]:
                    if name in fitted:  # each slot's decoder goes on from the chunk before, as a server's would
                        runs[name].append(serve(fitted[name], [Request(p, config) for p in chunk], level,
                                                adapt=False, slots_from=runs[name][-1] if runs[name] else None))
            for name, parts in runs.items():
                served = [s for run in parts for s in run.served]
                # speedup: per chunk over vanilla's serve of the same chunk (close in time), geometric mean
                paired = [math.log(run.throughput / base.throughput)
                          for run, base in zip(parts, runs["vanilla"]) if run.throughput and base.throughput]
                gens = [s.generation for s in served]
                steps = sum(len(g.accepted) - 1 for g in gens)
                rounds.setdefault(name, []).append({
                    "throughput": sum(run.output_tokens for run in parts) / sum(run.wall_time for run in parts),
                    "accepted": sum(len(g.tokens) - 1 for g in gens) / max(1, steps),
                    "processed": sum(sum(run.step_tokens) for run in parts)
                                 / max(1, sum(sum(run.batch_sizes) for run in parts)),
                    "tpot": statistics.median(s.time_per_output_token for s in served) * 1000,
                    "ttft": statistics.median(s.time_to_first_token for s in served) * 1000,
                    "draft": fitted[name].describe().get("draft_size", "-"),
                    "speedup": math.exp(statistics.fmean(paired)) if paired else float("nan"),
                })
        for name, runs in rounds.items():  # the round with the median speedup (the lower middle)
            results[name, level] = sorted(runs, key=lambda x: (x["speedup"], x["throughput"]))[(len(runs) - 1) // 2]
        base = results["vanilla", level]["throughput"]
        print(f"\nconcurrency {level}")
        print(f"{'method':<11}{'tok/s':>9}{'speedup':>9}{'acc/step':>10}{'tok/seq/pass':>14}{'TPOT ms':>9}"
              f"{'TTFT ms':>9}  draft")
        for name in names:
            if (name, level) in results:
                r = results[name, level]
                print(f"{name:<11}{r['throughput']:>9.1f}{r['speedup']:>9.2f}{r['accepted']:>10.2f}"
                      f"{r['processed']:>14.2f}{r['tpot']:>9.1f}{r['ttft']:>9.0f}  {r['draft']}")
    print("\nwhere speculation stops paying (first level under "
          f"{PAYS}x vanilla; lowest speedup over all levels):")
    for name in names:
        if name == "vanilla" or name not in decoders:
            continue
        speedups = [(level, results[name, level]["speedup"]) for level in levels]
        under = next((level for level, s in speedups if s < PAYS), None)
        print(f"  {name:<11}{'never' if under is None else f'at {under}':>10}   lowest {min(s for _, s in speedups):.2f}x")
    first = results["vanilla", levels[0]]["throughput"]
    print("vanilla throughput over concurrency " + str(levels[0]) + ": " +
          ", ".join(f"{level}: {results['vanilla', level]['throughput'] / first:.2f}x" for level in levels))


if __name__ == "__main__":
    main()
