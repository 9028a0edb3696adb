"""Vanilla decoding on our engine vs transformers' ``model.generate``, measured interleaved.

Target: ratio (engine tokens/s ÷ generate tokens/s) >= 1.0, i.e. the shared engine is
no slower than the library baseline, so no method's speedup can hide a slow baseline.

    python benchmarks/engine_vs_generate.py [--dtypes float32,bfloat16] [--prompts 12] [--new 64]
    python benchmarks/engine_vs_generate.py --device cuda --dtypes bfloat16 --model random:llama-1b
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import add_model_args, load_bench_model, prompt_ids, sync
from methods.core.engine import Engine
from methods.vanilla import VanillaDecoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}, model {args.model}, "
          f"{args.prompts} prompts x {args.new} new tokens x {args.repeats} repeats, interleaved")
    print(f"{'dtype':<10}{'engine tok/s':>14}{'generate tok/s':>16}{'ratio (median)':>16}{'ratio (total)':>15}")
    for dtype in args.dtypes.split(","):
        model, tok = load_bench_model(args.model, args.device, dtype)
        device = model.device
        decoder = VanillaDecoder(Engine(model))
        # no stop ids: both sides generate exactly args.new tokens
        prompts = prompt_ids(tok, args.prompts, model.config.vocab_size)

        def run_engine(ids: list[int]) -> int:
            return len(decoder.generate(ids, args.new).tokens)

        def run_generate(ids: list[int]) -> int:
            out = model.generate(torch.tensor([ids], device=device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
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
                    sync(device)
                    t = time.perf_counter()
                    n = fn(ids)
                    sync(device)
                    per[name] = time.perf_counter() - t
                    times[name] += per[name]
                    tokens[name] += n
                ratios.append(per["generate"] / per["engine"])
        e_tps, g_tps = tokens["engine"] / times["engine"], tokens["generate"] / times["generate"]
        print(f"{dtype:<10}{e_tps:>14.1f}{g_tps:>16.1f}{statistics.median(ratios):>16.3f}{e_tps / g_tps:>15.3f}")


if __name__ == "__main__":
    main()
