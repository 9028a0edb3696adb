"""Why a 2-token pass can cost far more than a 1-token pass in float32 on a CPU: a probe of the kernels.

A verification pass multiplies a few rows (the tree's tokens) by every weight matrix. With
one row PyTorch takes a matrix-vector kernel that streams the weight once; with a few rows
it takes a general GEMM, which may pack (copy) the large operand first. This script times,
side by side and interleaved, ``F.linear(x, W)`` against the same product written the other
way round, ``(W @ x.T).T`` (the small operand is then the packed one), for the default
model's LM head and MLP shapes, in float32 and bfloat16.

A single matrix repeated sits in the CPU cache; a real decode step streams every weight from
DRAM. ``--model-walk`` therefore times one pass over a whole SmolLM2-135M's worth of distinct
layer projections (30 layers x q, k, v, o, gate, up, down), as a step meets them; that is the
measurement behind ``methods.core.engine.FEW_ROWS_LAYER``.

    python benchmarks/skinny_matmul.py [--rows 1,2,3,4,8,16] [--rounds 30] [--model-walk]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"lm_head 49152x576": (49152, 576), "mlp up 1536x576": (1536, 576), "mlp down 576x1536": (576, 1536)}


def timed(fn, rounds: int) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def model_walk(rows: list[int], rounds: int) -> None:
    """Every layer projection of a 30-layer SmolLM2-135M once per pass, weights from DRAM."""
    print("| dtype | rows | F.linear ms | (W @ x.T).T ms (1 row: padded to 2) | linear / 1-row linear | transposed / 1-row linear |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            weights = [(torch.randn(o, i) * 0.02).to(dtype) for _ in range(30) for o, i in LAYER_SHAPES]
            one = None
            for m in rows:
                xs = {i: torch.randn(max(m, 2), i).to(dtype) for i in (576, 1536)}

                def linear() -> None:
                    for w in weights:
                        F.linear(xs[w.shape[1]][:m], w)

                def transposed() -> None:
                    for w in weights:
                        (w @ xs[w.shape[1]].T).T

                a, b = timed(linear, rounds), timed(transposed, rounds)
                one = a if one is None else one
                print(f"| {str(dtype).replace('torch.', '')} | {m} | {a:.1f} | {b:.1f} | {a / one:.2f} | {b / one:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,3,4,8,16")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--model-walk", action="store_true", help="a whole model's layer projections, from DRAM")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    if args.model_walk:
        return model_walk(rows, max(3, args.rounds // 3))
    print("| dtype | shape | rows | F.linear ms | (W @ x.T).T ms | linear / 1-row linear |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for name, (out_f, in_f) in SHAPES.items():
                w = torch.randn(out_f, in_f, dtype=dtype) * 0.02
                one = None
                for m in rows:
                    x = torch.randn(m, in_f, dtype=dtype)
                    assert torch.allclose(F.linear(x, w).float(), (w @ x.T).T.float(), atol=1e-2, rtol=1e-2)
                    a = timed(lambda: F.linear(x, w), args.rounds)
                    b = timed(lambda: (w @ x.T).T, args.rounds)
                    one = a if one is None else one
                    print(f"| {str(dtype).replace('torch.', '')} | {name} | {m} | {a:.3f} | {b:.3f} | {a / one:.2f} |")


if __name__ == "__main__":
    main()
