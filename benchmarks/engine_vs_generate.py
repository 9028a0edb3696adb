"""Vanilla decoding on our engine vs transformers' ``model.generate``, measured interleaved.

Target: ratio (engine tokens/s ÷ generate tokens/s) >= 1.0, i.e. the shared engine is
no slower than the library baseline, so no method's speedup can hide a slow baseline.

    python benchmarks/engine_vs_generate.py [--dtypes float32,bfloat16] [--prompts 12] [--new 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness.models import load_model
from harness.prompts import encode_conversation
from methods.engine import Engine
from methods.vanilla import VanillaDecoder
from tasks.builtin import _PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.prompts} prompts x "
          f"{args.new} new tokens x {args.repeats} repeats, interleaved")
    print(f"{'dtype':<10}{'engine tok/s':>14}{'generate tok/s':>16}{'ratio (median)':>16}{'ratio (total)':>15}")
    for dtype in args.dtypes.split(","):
        model, tok = load_model(args.model, device="cpu", dtype=dtype)
        decoder = VanillaDecoder(Engine(model))
        # no stop ids: both sides generate exactly args.new tokens
        prompts = [encode_conversation(tok, [{"role": "user", "content": p}]) for _, p, _ in _PROMPTS[: args.prompts]]

        def run_engine(ids: list[int]) -> int:
            return len(decoder.generate(ids, args.new).tokens)

        def run_generate(ids: list[int]) -> int:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
            return out.shape[1] - len(ids)

        run_engine(prompts[0]), run_generate(prompts[0])  # warm-up
        times = {"engine": 0.0, "generate": 0.0}
        tokens = {"engine": 0, "generate": 0}
        ratios = []
        for r in range(args.repeats):
            for i, ids in enumerate(prompts):
                pair = [("engine", run_engine), ("generate", run_generate)]
                if (i + r) % 2:
                    pair.reverse()
                per = {}
                for name, fn in pair:
                    t = time.perf_counter()
                    n = fn(ids)
                    per[name] = time.perf_counter() - t
                    times[name] += per[name]
                    tokens[name] += n
                ratios.append(per["generate"] / per["engine"])
        e_tps, g_tps = tokens["engine"] / times["engine"], tokens["generate"] / times["generate"]
        print(f"{dtype:<10}{e_tps:>14.1f}{g_tps:>16.1f}{statistics.median(ratios):>16.3f}{e_tps / g_tps:>15.3f}")


if __name__ == "__main__":
    main()
