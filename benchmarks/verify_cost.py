"""What verifying n tokens in one pass costs, relative to one token, per dtype.

    python benchmarks/verify_cost.py [--sizes 1,2,4,8,16,32,64] [--context 300]

Speculative decoding wins only if a pass over the draft costs little more than a pass
over one token. On a GPU that holds to large n; on a CPU it depends on the dtype and the
matrix units (bf16 on AMX or AVX512-BF16 stays nearly flat for a few tokens, float32 does
not). Read speedups with this.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import add_model_args, load_bench_model, sync
from methods.core.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"{'dtype':<10}" + "".join(f"{n:>8}" for n in sizes) + "   (time of an n-token pass / 1-token pass)")
    for dtype in args.dtypes.split(","):
        model, _ = load_bench_model(args.model, args.device, dtype)
        engine = Engine(model)
        engine.reset(args.context + max(sizes) + 1)
        engine.forward(list(range(args.context)), commit=True)
        times = {}
        for n in sizes:
            bias = engine.tree_bias(torch.ones(n, n, dtype=torch.bool).tril()) if n > 1 else None
            engine.forward(list(range(n)), step_bias=bias)  # warm-up
            sync(engine.device)
            start = time.perf_counter()
            for _ in range(args.repeats):
                engine.forward(list(range(n)), step_bias=bias)
            sync(engine.device)
            times[n] = (time.perf_counter() - start) / args.repeats
        print(f"{dtype:<10}" + "".join(f"{times[n] / times[1]:>8.2f}" for n in sizes)
              + f"   (1 token: {times[1] * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
