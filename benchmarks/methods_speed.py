"""Every method end to end on one device: tokens/s against vanilla on the same prompts, interleaved.

    python benchmarks/methods_speed.py [--device cuda] [--dtype bfloat16] [--model random:llama-1b]

With ``random:SHAPE`` models the weights, Medusa heads and FIRP maps are random (heads
zero-initialised, maps identity), so acceptance means nothing: the run measures speed,
the cost of each method's step, and peak GPU memory. With a real model the shipped weights
are used.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_model_args, load_bench_model, method_options, prompt_ids, sync

from methods.core.engine import Engine
from methods.registry import get_spec

METHODS = ("vanilla", "pld", "lookahead", "medusa", "firp", "self_spec")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    model, tok = load_bench_model(args.model, args.device, args.dtype)
    device = model.device
    engine = Engine(model)
    overrides, model_name = method_options(model, tok, args.model)
    decoders = {}
    for name in args.methods.split(","):
        spec = get_spec(name)
        decoders[name] = spec.decoder(engine, model_name=model_name, **overrides.get(name, {}))
    prompts = prompt_ids(tok, args.prompts, model.config.vocab_size)
    for d in decoders.values():  # warm-up: kernels, allocator, caches
        d.generate(prompts[0], args.new)  # the measured length: a shorter one leaves the shared
        # engine's cache to grow inside the first timed call, slowing whichever method runs first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = {name: {"time": 0.0, "tokens": 0, "forwards": 0, "processed": 0} for name in decoders}
    for i, ids in enumerate(prompts):
        order = list(decoders)[i % len(decoders):] + list(decoders)[:i % len(decoders)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            gen = decoders[name].generate(ids, args.new)
            sync(device)
            s = stats[name]
            s["time"] += time.perf_counter() - start
            s["tokens"] += len(gen.tokens)
            s["forwards"] += gen.target_forwards
            s["processed"] += sum(gen.processed)
    base = stats["vanilla"]["tokens"] / stats["vanilla"]["time"] if "vanilla" in stats else float("nan")
    print(f"{args.model} on {device} ({str(engine.dtype).removeprefix('torch.')}), {args.prompts} prompts x "
          f"{args.new} tokens; random weights: acceptance means nothing" if tok is None else "")
    print(f"{'method':<11}{'tok/s':>9}{'vs vanilla':>12}{'acc. length':>13}{'processed/step':>16}{'ms/step':>9}")
    for name, s in stats.items():
        tps = s["tokens"] / s["time"]
        print(f"{name:<11}{tps:>9.1f}{tps / base:>12.2f}{s['tokens'] / s['forwards']:>13.2f}"
              f"{s['processed'] / s['forwards']:>16.1f}{1000 * s['time'] / s['forwards']:>9.2f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
