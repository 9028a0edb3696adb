"""A decode step's memory-bandwidth limit beside vanilla's and every method's measured step.

    python benchmarks/roofline.py [--model smollm2-135m] [--dtypes float32,bfloat16] [--context 256]
                                  [--methods vanilla,pld,...] [--prompts 3] [--new 64] [--device cuda]
                                  [--engine-from GIT_REV]

A batch-1 decode step reads every weight it uses and the KV cache from memory once, so it
cannot take less than those bytes over the machine's read bandwidth: the limit. A baseline
far from it is a slow baseline, and a speedup over it is partly the baseline's slowness
(arXiv 2601.11580). The bandwidth is measured afresh (CPU: the fastest streaming read over
1 GiB with the run's threads; GPU: a device copy), not taken from the harness's cache.
Per token, a method that accepts several tokens a step can beat the one-token limit.
``--engine-from REV`` also times vanilla's step on the engine of an earlier git revision, on a
copy of the same model, interleaved round by round with today's: a before/after on one machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_model_args, load_bench_model, prompt_ids, sync

from harness.models import resolve_device
from methods.core.engine import Engine
from methods.core.errors import UserError
from methods.core.hardware import decode_step_bytes, machine, machine_label, measure_read_bandwidth, step_limit_ms
from methods.core.options import parse_options
from methods.registry import get_spec

METHODS = ("vanilla", "pld", "lookahead", "medusa", "firp", "self_spec", "eagle", "sps")


@torch.no_grad()
def vanilla_step_ms(engine: Engine, context: int, rounds: int = 30) -> float:
    """Median one-token forward (LM head included) after ``context`` cached tokens, after warm-up."""
    return before_after_ms([engine], context, rounds)[0]


def engine_class_from(rev: str) -> type:
    """``methods.core.engine.Engine`` as it was at git revision ``rev`` (the rest of the tree as it is)."""
    source = subprocess.run(["git", "show", f"{rev}:methods/core/engine.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "engine_at_rev.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("engine_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Engine


@torch.no_grad()
def before_after_ms(engines: list[Engine], context: int, rounds: int = 30) -> list[float]:
    """Median one-token step of each engine, interleaved round by round so load drift hits all alike."""
    vocab = engines[0].config.vocab_size
    for engine in engines:
        engine.reset(context + 2)
        engine.forward([i % vocab for i in range(context)], commit=True, want_logits=False)
    times: list[list[float]] = [[] for _ in engines]
    for r in range(rounds + 3):
        for engine, bucket in zip(engines, times):
            sync(engine.device)
            start = time.perf_counter()
            engine.forward([r % vocab])
            sync(engine.device)
            if r >= 3:
                bucket.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def print_method_rows(engine: Engine, names: list[str], model_name: str, prompts: list[list[int]], new: int,
                      limit_ms: float) -> None:
    """Each ready method's decode steps (prefill left out) over every prompt, after one warm-up."""
    for name in names:
        spec = get_spec(name)
        try:
            spec.decoder.check_ready(model_name, parse_options(spec.options, {}, where=name))
            decoder = spec.decoder(engine, model_name=model_name)
        except UserError as exc:
            print(f"  {name}: skipped ({str(exc).splitlines()[0]})")
            continue
        decoder.generate(prompts[0], new)  # warm-up at the measured length: kernels, caches
        seconds = steps = tokens = 0.0
        for ids in prompts:
            gen = decoder.generate(ids, new)  # step times on the decoder's own clock, synchronised
            seconds += sum(gen.step_times[1:])
            steps += gen.target_forwards - 1
            tokens += len(gen.tokens) - 1  # the first token comes from the prefill
        per_step, per_token = 1000 * seconds / max(steps, 1), 1000 * seconds / max(tokens, 1)
        print(f"  {name:<11}{per_step:>9.1f}{per_token:>10.1f}{tokens / max(steps, 1):>9.2f}"
              f"{limit_ms / per_step:>12.0%}{limit_ms / per_token:>13.0%}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--context", type=int, default=256, help="cached tokens before vanilla's timed step")
    ap.add_argument("--methods", default=None, help=f"default: {','.join(METHODS)}, those ready for the model")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--engine-from", default=None, metavar="REV",
                    help="also time vanilla's step on the engine of this git revision (before/after)")
    args = ap.parse_args()
    old_engine = engine_class_from(args.engine_from) if args.engine_from else None
    device = resolve_device(args.device)
    found = measure_read_bandwidth(device)
    load = f", other processes kept {found.load:.0%} of the cores busy" if found.load else ""
    print(f"{machine_label(machine(device))}: read bandwidth {found.gbs:.1f} GB/s ({found.kernel}{load})", flush=True)
    for dtype in args.dtypes.split(","):
        model, tok = load_bench_model(args.model, args.device, dtype)
        reference = copy.deepcopy(model) if old_engine is not None else None
        engine = Engine(model)
        step_bytes = decode_step_bytes(model, args.context)
        limit = step_limit_ms(step_bytes, found.gbs)
        vanilla = vanilla_step_ms(engine, args.context)
        print(f"\n{args.model} {dtype}: {step_bytes / 1e6:.0f} MB a step at {args.context} tokens of context, "
              f"limit {limit:.1f} ms; vanilla {vanilla:.1f} ms a step: {limit / vanilla:.0%} of the limit", flush=True)
        if old_engine is not None:
            before, after = before_after_ms([old_engine(reference), engine], args.context)
            print(f"  engine at {args.engine_from}: {before:.1f} ms a step ({limit / before:.0%} of the limit); "
                  f"this tree's, interleaved with it: {after:.1f} ms ({limit / after:.0%}); "
                  f"{before / after:.2f}x faster", flush=True)
            del reference
        names = args.methods.split(",") if args.methods else list(METHODS)
        prompts = prompt_ids(tok, args.prompts, model.config.vocab_size)
        print(f"  {args.prompts} prompts x {args.new} tokens, decode steps only (limit {limit:.1f} ms a step):")
        print(f"  {'method':<11}{'ms/step':>9}{'ms/token':>10}{'tok/step':>9}{'limit/step':>12}{'limit/token':>13}")
        print_method_rows(engine, names, args.model if tok is not None else "", prompts, args.new, limit)


if __name__ == "__main__":
    main()
