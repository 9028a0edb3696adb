"""Where a batched step's time goes: one method served at each concurrency level under the profiler.

    python benchmarks/load_profile.py [--method vanilla] [--levels 1,4,8,16] [--new 32]
                                      [--model random:smollm2-135m --device cuda] [--dtype auto]

For each level it serves ``level`` requests once to warm up, then once under ``torch.profiler``,
and prints the median step (``LoadRun.step_times``), the serve loop's phases (prefill, draft,
forward, accept, keep, update: the ``serve.*`` ranges, host time and, on a GPU, device time),
and the operators with the most device time (host time on a CPU). A step whose time grows
faster than its batch points at the phase and the kernel that do.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import add_model_args, load_bench_model, method_options, prompt_ids
from torch.profiler import ProfilerActivity, profile

from methods.core.batch import Request, serve
from methods.core.decoder import GenConfig
from methods.core.engine import Engine
from methods.registry import get_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--method", default="vanilla")
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--new", type=int, default=32, help="new tokens per request")
    ap.add_argument("--top", type=int, default=12, help="operators to list per level")
    args = ap.parse_args()
    model, tok = load_bench_model(args.model, args.device, args.dtype)
    engine = Engine(model)
    overrides, model_name = method_options(model, tok, args.model)
    decoder = get_spec(args.method).decoder(engine, model_name=model_name, **overrides.get(args.method, {}))
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    levels = [int(x) for x in args.levels.split(",")]
    prompts = prompt_ids(tok, max(levels), model.config.vocab_size)
    print(f"{args.method} on {args.model}, {engine.device} ({str(engine.dtype).removeprefix('torch.')}); "
          f"{args.new} new tokens per request, as many requests as the level")
    for level in levels:
        requests = [Request(p, GenConfig(args.new)) for p in prompts[:level]]
        serve(decoder, requests, level, adapt=False)
        with profile(activities=activities) as prof:
            run = serve(decoder, requests, level, adapt=False)
            if cuda:
                torch.cuda.synchronize(engine.device)
        step = statistics.median(run.step_times) * 1000
        print(f"\nconcurrency {level}: median step {step:.2f} ms ({step / level:.2f} ms a sequence), "
              f"{run.throughput:.1f} tok/s, {len(run.step_times)} steps")
        events = prof.key_averages()
        print(f"  {'phase':<16} {'calls':>6} {'host ms':>9} {'device ms':>10}")
        for event in sorted((e for e in events if e.key.startswith("serve.")), key=lambda e: e.key):
            device_ms = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / 1000
            print(f"  {event.key:<16} {event.count:>6} {event.cpu_time_total / 1000:>9.1f} {device_ms:>10.1f}")
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=args.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
