"""Peak RSS over many generations: it must not grow with the number of prompts.

    python benchmarks/memory.py [--generations 200] [--new 16]

Prints peak resident memory after 50, 100 and 200 generations (vanilla decoder on the
engine, the built-in prompts cycled), plus the current RSS, so a leak in the engine,
cache or results path shows up as a rising column.
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

from harness.models import load_model
from harness.prompts import encode_conversation, stop_token_ids
from methods.engine import Engine
from methods.vanilla import VanillaDecoder
from tasks.builtin import _PROMPTS


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
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m", device="cpu", dtype=args.dtype)
    decoder = VanillaDecoder(Engine(model))
    stop = stop_token_ids(tok, model)
    prompts = [encode_conversation(tok, [{"role": "user", "content": p}]) for _, p, _ in _PROMPTS]
    checkpoints = {50, 100, 200, args.generations}
    print(f"{'generations':>12}{'peak RSS MiB':>14}{'current RSS MiB':>17}")
    for i in range(1, args.generations + 1):
        decoder.generate(prompts[i % len(prompts)], args.new, stop)
        if i in checkpoints:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{i:>12}{peak:>14.1f}{rss_mib():>17.1f}", flush=True)


if __name__ == "__main__":
    main()
