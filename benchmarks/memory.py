"""Peak RSS over many generations: it must not grow with the number of prompts.

    python benchmarks/memory.py [--generations 200] [--new 16] [--device cuda]

Prints peak resident memory after 50, 100 and 200 generations (vanilla decoder on the
engine, the built-in prompts cycled), plus the current RSS (and on CUDA the peak and
current GPU memory), so a leak in the engine, cache or results path shows up as a rising
column.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import torch
from common import add_model_args, load_bench_model, prompt_ids

from methods.core.engine import Engine
from methods.core.prompts import stop_token_ids
from methods.vanilla import VanillaDecoder


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=200)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    add_model_args(ap)
    args = ap.parse_args()
    model, tok = load_bench_model(args.model, args.device, args.dtype)
    decoder = VanillaDecoder(Engine(model))
    stop = stop_token_ids(tok, model) if tok is not None else []
    prompts = prompt_ids(tok, 12, model.config.vocab_size)
    cuda = model.device.type == "cuda"
    checkpoints = {50, 100, 200, args.generations}
    print(f"{'generations':>12}{'peak RSS MiB':>14}{'current RSS MiB':>17}"
          + (f"{'peak GPU MiB':>14}{'GPU MiB':>10}" if cuda else ""))
    for i in range(1, args.generations + 1):
        decoder.generate(prompts[i % len(prompts)], args.new, stop)
        if i in checkpoints:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            gpu = (f"{torch.cuda.max_memory_allocated() / 2**20:>14.1f}{torch.cuda.memory_allocated() / 2**20:>10.1f}"
                   if cuda else "")
            print(f"{i:>12}{peak:>14.1f}{rss_mib():>17.1f}{gpu}", flush=True)


if __name__ == "__main__":
    main()
