"""The two costs of training a draft head, in the arithmetic the trainers pick and in the one
they avoid, side by side: the evidence behind ``methods.core.training.autocast`` and the
float32 route of the feature cache (``methods.core.engine.upcast_linears``).

    python benchmarks/train_precision.py [--rows 1024] [--batch 8] [--length 256] [--repeats 3]

1. Caching features: one pass of the bf16 model over ``--batch`` x ``--length`` tokens, with
   bf16 products (native or emulated) and with ``upcast_linears`` (float32 products of the
   same bf16 weights, outputs rounded to bf16), and the relative difference between their
   final features, so the route is seen to keep the bf16 model's features.
2. A training step's largest product: the LM head over ``--rows`` rows, forward and backward,
   under bf16 autocast and in float32.

Prints seconds (median of ``--repeats``) and the ratios; the machine's vector units decide
which way they fall (on a CPU with AVX512-BF16 or AMX the bf16 forms are the fast ones).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import add_model_args, load_bench_model

from methods.core.engine import upcast_linears
from methods.core.hardware import cpu_has_native_bf16, vector_units


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, the float32 shadows
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--rows", type=int, default=1024, help="LM-head rows of the training product")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = load_bench_model(args.model, "cpu", "bfloat16")
    model.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length))

    def features() -> torch.Tensor:
        with torch.no_grad():
            return model.model(input_ids=ids).last_hidden_state

    def upcast_features() -> torch.Tensor:
        with upcast_linears(model):
            return features()

    native = median_seconds(features, args.repeats)
    with upcast_linears(model):  # one context: the shadows are made once, as in the cache
        upcast = median_seconds(features, args.repeats)
    a, b = features().float(), upcast_features().float()
    diff = ((a - b).norm() / a.norm()).item()

    weight = model.lm_head.weight.detach().float()
    x = torch.randn(args.rows, weight.shape[1], requires_grad=True)

    def step(bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.linear(x, weight).float().logsumexp(-1).mean()
            loss.backward()
        return run

    auto = median_seconds(step(True), args.repeats)
    fp32 = median_seconds(step(False), args.repeats)
    units = ", ".join(vector_units()) or "none"
    print(f"{args.model} on cpu ({units}; bf16 arithmetic: {'yes' if cpu_has_native_bf16() else 'no'}), "
          f"{torch.get_num_threads()} threads")
    print(f"caching features, {args.batch}x{args.length} tokens: bf16 products {native:.2f} s, "
          f"upcast_linears {upcast:.2f} s ({native / upcast:.2f}x faster); features differ by {diff:.2%} (relative norm)")
    print(f"LM head over {args.rows} rows, forward + backward: bf16 autocast {auto:.2f} s, "
          f"float32 {fp32:.2f} s ({auto / fp32:.2f}x faster in float32)")
    print(f"the trainers pick: {'bf16 autocast' if cpu_has_native_bf16() else 'float32'}")


if __name__ == "__main__":
    main()
