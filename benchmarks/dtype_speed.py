"""float32 against bfloat16 on one device, every method, interleaved prompt by prompt: the
evidence behind what ``--dtype auto`` picks.

    python benchmarks/dtype_speed.py [--device cpu] [--methods vanilla,pld,medusa,firp] [--prompts 6]

Prints tokens/s per method and dtype, the bf16/fp32 ratio of each method, and each method's
speedup over vanilla within each dtype. The two models are loaded side by side, and each
prompt runs every (method, dtype) pair in a rotating order, so drifting machine load hits
both dtypes alike.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import add_model_args, load_bench_model, prompt_ids, sync

from methods.core.engine import Engine
from methods.registry import get_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--methods", default="vanilla,pld,lookahead,medusa,firp")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new", type=int, default=96)
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    methods = args.methods.split(",")
    decoders, device, tok = {}, None, None
    for dt in dtypes:
        model, tok = load_bench_model(args.model, args.device, dt)
        device = model.device
        engine = Engine(model)
        for name in methods:
            decoders[name, dt] = get_spec(name).decoder(engine, model_name=args.model)
    prompts = prompt_ids(tok, args.prompts, 0)
    for d in decoders.values():  # warm-up: kernels, allocator, caches
        d.generate(prompts[0], 8)
    # per (method, dtype): per-prompt tokens/s
    rates: dict[tuple[str, str], list[float]] = {key: [] for key in decoders}
    keys = list(decoders)
    for i, ids in enumerate(prompts):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            sync(device)
            start = time.perf_counter()
            gen = decoders[key].generate(ids, args.new)
            sync(device)
            rates[key].append(len(gen.tokens) / (time.perf_counter() - start))

    def gmean(xs: list[float]) -> float:
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    print(f"{args.model} on {device}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.prompts} prompts x {args.new} tokens")
    head = "".join(f"{dt + ' tok/s':>18}" for dt in dtypes) + "".join(f"{dt + ' vs vanilla':>22}" for dt in dtypes)
    print(f"{'method':<11}{head}{'ratio ' + dtypes[-1] + '/' + dtypes[0]:>24}")
    for name in methods:
        row = "".join(f"{gmean(rates[name, dt]):>18.1f}" for dt in dtypes)
        row += "".join(f"{gmean([a / b for a, b in zip(rates[name, dt], rates['vanilla', dt])]):>22.2f}"
                       for dt in dtypes) if "vanilla" in methods else ""
        ratio = gmean([a / b for a, b in zip(rates[name, dtypes[-1]], rates[name, dtypes[0]])])
        print(f"{name:<11}{row}{ratio:>24.2f}")


if __name__ == "__main__":
    main()
