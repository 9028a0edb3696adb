"""``python -m harness``: run, list, report, compare, baseline, check, train, tune, analyze.

User errors print one line and exit 2; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from base.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line plus a pointer to --help (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _pairs(items: list[str], flag: str, shape: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects {shape}, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _method_options(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    options: dict[str, dict[str, str]] = {}
    for key, value in _pairs(args.method_option, "--method-option", "METHOD.KEY=VALUE").items():
        method, sep, name = key.partition(".")
        if not sep or not name:
            raise UserError(f"--method-option expects METHOD.KEY=VALUE, got {key}={value}")
        options.setdefault(method, {})[name] = value
    return options


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _tasks(text: str) -> list[str]:
    from tasks.base import split_tasks

    try:
        return split_tasks(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _methods(text: str) -> list[str]:
    from harness.config import split_methods

    return split_methods(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    from harness.config import DEFAULT_MAX_NEW_TOKENS, EXECUTORS, QUICK_LIMIT, QUICK_MAX_NEW_TOKENS, RunConfig

    d = RunConfig()  # the run's defaults live in harness.config; the flags and their help read them from there
    run = sub.add_parser("run", help="benchmark methods over task suites", description=(
        "Decode every example with every method (interleaved per example), write results.jsonl + "
        "manifest.json to the run folder, and print a summary. Rerunning the same command resumes."))
    run.add_argument("--methods", type=_methods, default=None, help=(
        "comma-separated methods or variants, e.g. vanilla,medusa,medusa@tree=8x4x2,pld@num_tokens=5; vanilla runs "
        "as the baseline beside any other method unless --no-baseline (default: every method ready for the "
        "model, i.e. needing no weights or with weights shipped or given, beside vanilla; then --limit and "
        f"--max-new-tokens default to {QUICK_LIMIT} and {QUICK_MAX_NEW_TOKENS}, a quick first comparison)"))
    run.add_argument("--no-baseline", action="store_true", help="do not add vanilla (no speedups or exact match)")
    run.add_argument("--tasks", type=_tasks, default=d.tasks, help=(
        "comma-separated task suites, each suite[:cat1+cat2] with its categories joined by '+', e.g. "
        f"spec_bench:summarization+math_reasoning,builtin (default: {','.join(d.tasks)})"))
    run.add_argument("--model", default=d.model,
                     help=f"embedded model name, local Hugging Face folder, or hub id (default: {d.model})")
    run.add_argument("--device", default=d.device, help=f"cpu, cuda, cuda:N or auto (default: {d.device})")
    run.add_argument("--dtype", default=d.dtype, help="float32, bfloat16, float16 or auto (default: auto = "
                     "bfloat16 on CUDA and on CPUs with bf16 units or AVX2, where vanilla decodes fastest, else float32; "
                     "use float32 for strict exact-match losslessness)")
    run.add_argument("--max-new-tokens", type=_int, default=None,
                     help=f"tokens to generate per turn (default: {DEFAULT_MAX_NEW_TOKENS}; {QUICK_MAX_NEW_TOKENS} "
                          "when --methods is not given)")
    run.add_argument("--limit", type=_int, default=None,
                     help=f"examples per task, a seeded sample (default: all; {QUICK_LIMIT} when --methods is not given)")
    run.add_argument("--seed", type=_int, default=d.seed,
                     help=f"seed for --limit sampling and token sampling (default: {d.seed})")
    run.add_argument("--temperature", type=_float, default=d.temperature,
                     help="sampling temperature; 0 = greedy (default). Every method keeps the target distribution")
    run.add_argument("--top-p", type=_float, default=d.top_p,
                     help=f"nucleus sampling threshold with --temperature (default {d.top_p:g})")
    run.add_argument("--warmup", type=_int, default=d.warmup,
                     help=f"uncounted warm-up rounds per method (default: {d.warmup})")
    run.add_argument("--repeats", type=_int, default=d.repeats,
                     help="timed rounds per example and method, interleaved; the round with the median time per "
                          f"token is kept (default: {d.repeats}). Use 3 or more to decide speedups near 1.0 on a noisy machine")
    run.add_argument("--concurrency", default=None, metavar="N1,N2,...",
                     help="decode under load: requests in flight, one measurement per level, e.g. 1,4,16 "
                          "(default: one request at a time); methods that cannot decode batched are refused "
                          "(`python -m harness list` says which)")
    run.add_argument("--request-rate", type=_float, default=None, metavar="R",
                     help="with --concurrency: requests arrive at R per second (seeded Poisson, the same arrivals "
                          "for every method), at most the level in flight (default: a new request as soon as one "
                          "finishes)")
    run.add_argument("--costs-from", default=None, metavar="FILE",
                     help="replay the measured costs (verify-cost curve, drafting costs) of a baseline JSON, a run's "
                          "manifest.json or run folder instead of measuring them: `auto` trees and the cost policies "
                          "then choose as on that machine (the CI gate replays its baseline's)")
    run.add_argument("--data-dir", default=None, help="folder with <suite>/<file> data (e.g. ../shared/data)")
    run.add_argument("--task-path", action="append", default=[], metavar="SUITE=FILE",
                     help="a suite's data file in another layout (repeatable)")
    run.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                     help="suite options, e.g. xsum.max_words=400, jsonl.prompt=question (repeatable)")
    run.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                     help="method settings for every variant of METHOD, e.g. medusa.heads=DIR, medusa.tree=4x2x1, "
                          "firp.tree=3x2x1 (repeatable; `python -m harness list` shows each method's options)")
    run.add_argument("--out", default=None, help="run folder (default: runs/<model>-<dtype>-<config hash>)")
    run.add_argument("--overwrite", action="store_true", help="discard results already in --out")
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="run only the I-th of N deterministic parts of the examples (1 <= I <= N), into "
                          "results.shard-I-of-N.jsonl in the same --out; readers merge the shards")
    run.add_argument("--executor", default=d.executor, choices=EXECUTORS,
                     help="local: decode in this process (default); ray: spread the examples over Ray actors, "
                          "each with the model loaded once (needs pip install -e \".[ray]\")")
    run.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="an existing Ray cluster (from `ray start --head`); default: start a local one")
    run.add_argument("--workers", type=_int, default=None,
                     help="Ray actors (default: the cluster's GPUs / --gpus-per-worker, or its CPUs)")
    run.add_argument("--gpus-per-worker", type=_float, default=d.gpus_per_worker, metavar="G",
                     help=f"GPUs per Ray actor (default {d.gpus_per_worker:g})")
    run.add_argument("--threads-per-worker", type=_int, default=None,
                     help="torch threads per Ray actor (default: this machine's cores // --workers)")

    sub.add_parser("list", help="list methods, tasks and models")

    tr = sub.add_parser("train", help="train a method's draft heads on the frozen model", description=(
        "Self-distils the model on the training prompts (its own greedy answers), caches frozen-model features, "
        "trains the heads with resumable checkpoints, and writes safetensors + config.json to --out."))
    tr.add_argument("method", help="a trainable method (see `python -m harness list`)")
    tr.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    tr.add_argument("--model", default="smollm2-135m")
    tr.add_argument("--data", nargs="+", default=[], metavar="FILE", help="training JSONL files (never eval files)")
    tr.add_argument("--out", required=True, metavar="DIR")
    tr.add_argument("--dtype", default="bfloat16", help="frozen model dtype for distillation (default bfloat16)")
    tr.add_argument("--limit", type=_int, default=1200, help="training prompts (default 1200)")
    tr.add_argument("--max-new-tokens", type=_int, default=96, help="self-distilled answer length (default 96)")
    tr.add_argument("--self-prompts", type=_int, default=0, metavar="N",
                    help="also distil on N requests the model writes itself across task kinds and topics "
                         "(chat, summaries, translation, code; cached and resumable; default 0)")
    tr.add_argument("--summary-prompts", type=_int, default=0, metavar="N",
                    help="also distil on N summary requests over the training files' passages (BoolQ), "
                         "with instructions written here (default 0)")
    tr.add_argument("--init-from", default=None, metavar="DIR",
                    help="start from the trained weights in DIR (same method and options) instead of afresh")
    tr.add_argument("--epochs", type=_int, default=2,
                    help="the most epochs; training stops earlier when the validation metric stops improving")
    tr.add_argument("--eval-every", type=_int, default=50, help="optimiser steps between validations (default 50)")
    tr.add_argument("--patience", type=_int, default=3,
                    help="validations without improvement before training stops (default 3)")
    tr.add_argument("--lr", type=_float, default=1e-3, help="peak learning rate (default 1e-3)")
    tr.add_argument("--schedule", choices=("cosine", "plateau"), default="cosine",
                    help="cosine: decay the lr to zero over --epochs; plateau: hold it, and at each plateau "
                         "(--patience validations without improvement) multiply it by --lr-factor, stopping at "
                         "a plateau after --max-lr-cuts cuts (default cosine)")
    tr.add_argument("--lr-factor", type=_float, default=0.3,
                    help="plateau schedule: what each cut multiplies the lr by, between 0 and 1 (default 0.3)")
    tr.add_argument("--max-lr-cuts", type=_int, default=2,
                    help="plateau schedule: lr cuts before a plateau stops training (default 2)")
    tr.add_argument("--batch", type=_int, default=4, help="sequences per optimiser step (default 4)")
    tr.add_argument("--seed", type=_int, default=0)
    tr.add_argument("--max-steps", type=_int, default=None,
                    help="stop after this many optimiser steps (0: only validate the starting weights, e.g. --init-from's, on this data's held-out split)")
    tr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="method settings, e.g. heads=3, layout=shared|upstream, tree=4x2x1, layers=10")
    tr.add_argument("--allow-eval-data", action="store_true", help="permit training on evaluation files")

    tune = sub.add_parser("tune", help="tune a method's settings (self_spec: its skip set; lookahead: its window, "
                                       "n-gram size and guesses; both by Bayesian optimisation)")
    tune.add_argument("method", help="a tunable method (see `python -m harness list`)")
    tune.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    tune.add_argument("--model", default="smollm2-135m")
    tune.add_argument("--data", nargs="+", default=[], metavar="FILE", help="training JSONL files (never eval files)")
    tune.add_argument("--out", default=None, metavar="FILE",
                      help="where the result goes (default: skip.json for self_spec, lookahead.json for lookahead)")
    tune.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the run's rule)")
    tune.add_argument("--trials", type=_int, default=40)
    tune.add_argument("--draft", type=_int, default=None,
                      help="self_spec: draft tokens per step in every trial, no adaptive exit, so a cheap but wrong "
                           "draft pays for itself (default 4)")
    tune.add_argument("--space", default="blocks", choices=("blocks", "free"),
                      help="self_spec: contiguous attention/MLP blocks with priors (default) or one bit per sublayer")
    tune.add_argument("--prompts", type=_int, default=6)
    tune.add_argument("--max-new-tokens", type=_int, default=None, help="tokens per prompt (default: 32; lookahead 64)")
    tune.add_argument("--seed", type=_int, default=0)

    ana = sub.add_parser("analyze", help="a method's analysis (firp: pseudo vs real hidden states, per-step accuracy)")
    ana.add_argument("method", help="an analyzable method (see `python -m harness list`)")
    ana.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ana.add_argument("--model", default="smollm2-135m")
    ana.add_argument("--weights", default=None, metavar="DIR", help="the method's weights (default: the shipped ones)")
    ana.add_argument("--compare", default=None, metavar="DIR", help="a second set of maps, e.g. parallel mode")
    ana.add_argument("--data", nargs="+", default=[], metavar="FILE",
                     help="the files the maps trained on: the analysis answers their rows that training never "
                          "selected (read from the weights' config.json)")
    ana.add_argument("--sequences", type=_int, default=24, help="held-out sequences to analyse (default 24)")
    ana.add_argument("--sweep-layers", default=None, metavar="L1,L2,...",
                     help="firp: train maps at each of these prediction layers (a fixed budget each) and measure "
                          "validation accepted length and per-step cost, e.g. 6,8,10,12,14,18")
    ana.add_argument("--sweep-steps", type=_int, default=100,
                     help="firp sweep: optimiser steps per layer after the ridge start (default 100; 0: the ridge start alone)")
    ana.add_argument("--dtype", default="auto", help="firp sweep: dtype of the step-cost measurement (default auto)")
    ana.add_argument("--sweep-input", default="anchor", help="firp sweep: what each map reads (default anchor)")
    ana.add_argument("--sweep-tree", type=_int, default=4, help="firp sweep: tree size of the accepted length (default 4)")
    ana.add_argument("--out", default="firp_analysis.json", metavar="FILE",
                     help="JSON output; put it in a run folder to show it in that run's report")

    rep = sub.add_parser("report", help="write RUN_DIR/report.html (run does this automatically)")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.add_argument("-o", "--output", default=None, metavar="FILE", help="default: RUN_DIR/report.html")

    cmp_ = sub.add_parser("compare", help="HTML diff of two runs with regressions highlighted")
    cmp_.add_argument("run_a", metavar="RUN_A")
    cmp_.add_argument("run_b", metavar="RUN_B")
    cmp_.add_argument("-o", "--output", default="compare.html", metavar="FILE")
    cmp_.add_argument("--force", action="store_true", help="compare even if models or task hashes differ")

    base = sub.add_parser("baseline", help="freeze a run's metrics as a regression baseline")
    base.add_argument("run_dir", metavar="RUN_DIR")
    base.add_argument("-o", "--output", required=True, metavar="FILE", help="baseline JSON to write")

    check = sub.add_parser("check", help="compare a run to a baseline; exit 1 on regression", description=(
        "Fails (exit 1) when a method's token ids differ from the baseline's, exact match or Rouge-2 drop; "
        "when the run replayed the baseline's costs (run --costs-from BASELINE), when any counter (accepted, "
        "draft and processed tokens and host synchronisations per step, forwards per token) or a choice made "
        "at setup changed; and, against a baseline from the same machine, when the speedups divided by the "
        "baseline's, example by example, have an interval wholly below 1 - --speed-margin."))
    check.add_argument("run_dir", metavar="RUN_DIR")
    check.add_argument("--baseline", required=True, metavar="FILE")
    check.add_argument("--tol-accepted-length", type=_float, default=0.01, help="absolute drop allowed (0.01)")
    check.add_argument("--tol-exact-match", type=_float, default=0.0, help="absolute drop allowed (0.0)")
    check.add_argument("--tol-rouge2", type=_float, default=0.005, help="absolute drop allowed (0.005)")
    check.add_argument("--speed-margin", type=_float, default=0.05,
                       help="how far below 1 the interval of the paired speedup ratios must end to fail (0.05)")
    check.add_argument("--speedup-floor", type=_float, default=None,
                       help="instead of the paired ratios: speedup must stay >= this fraction of the baseline's, "
                            "on any machine")
    check.add_argument("--force", action="store_true", help="compare even if the task hashes differ")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from harness.config import RunConfig, parse_concurrency
    from harness.progress import status
    from harness.results import parse_shard
    from harness.session import execute
    from harness.summary import print_summary

    # no --methods: a first run, every ready method with quick defaults (harness.config)
    config = RunConfig.first_run_or_given(
        args.methods, args.limit, args.max_new_tokens,
        tasks=args.tasks, model=args.model, device=args.device, dtype=args.dtype,
        seed=args.seed, warmup=args.warmup, repeats=args.repeats,
        data_dir=args.data_dir, out=args.out, overwrite=args.overwrite,
        task_paths=_pairs(args.task_path, "--task-path", "SUITE=FILE"),
        task_options=_pairs(args.task_option, "--task-option", "KEY=VALUE"),
        method_options=_method_options(args), temperature=args.temperature, top_p=args.top_p,
        baseline=not args.no_baseline,
        shard=parse_shard(args.shard) if args.shard is not None else None, executor=args.executor,
        ray_address=args.ray_address, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        threads_per_worker=args.threads_per_worker, costs_from=args.costs_from,
        concurrency=parse_concurrency(args.concurrency) if args.concurrency is not None else None,
        request_rate=args.request_rate,
    )
    out = execute(config)
    print_summary(out)
    from harness.report import build_report

    status("writing the report")
    print(f"Report: {build_report(out).resolve().as_uri()}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from harness.train import run_entry

    run_entry("tune", args.method, {k: v for k, v in vars(args).items() if k not in ("command", "method")})
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from harness.train import run_entry

    run_entry("analyze", args.method, {k: v for k, v in vars(args).items() if k not in ("command", "method")})
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.report import build_report

    out = build_report(Path(args.run_dir), Path(args.output) if args.output else None)
    print(f"Report: {out.resolve().as_uri()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.checks import machine_note, machine_of
    from harness.report import build_comparison
    from harness.results import read_manifest

    out = build_comparison(Path(args.run_a), Path(args.run_b), Path(args.output), force=args.force)
    note = machine_note(machine_of(read_manifest(Path(args.run_a))), machine_of(read_manifest(Path(args.run_b))))
    if note:
        print(note)
    print(f"Comparison: {out}")
    return 0


def _draft_size(decoder: type) -> str:
    """What a method drafts with beside the target, for each embedded model it ships weights for."""
    from harness.models import EMBEDDED_MODELS
    from methods.core.weights import weights_size

    locator = getattr(decoder, "weights", None)
    if locator is None:
        return "none (training-free)"
    shipped = [(name, locator.shipped(name)) for name in EMBEDDED_MODELS]
    sizes = []
    for name, path in shipped:
        if path is not None:
            size = weights_size(path)
            sizes.append(f"{size['parameters']:,} ({size['bytes'] / 1e6:.1f} MB on disk) shipped for {name}"
                         if size["parameters"] else f"0 (drafts with the target's own layers) for {name}")
    return "; ".join(sizes) or f"none shipped; set {decoder.weights.method}.{decoder.weights.option}"


def cmd_list(_: argparse.Namespace) -> int:
    from harness.models import EMBEDDED_MODELS
    from base.options import describe_options
    from methods.registry import available_methods, get_spec
    from tasks.base import available_tasks, describe_task, describe_task_options

    print("Methods:")
    for name in available_methods():
        spec = get_spec(name)
        extras = [kind for kind in ("train", "tune", "analyze") if getattr(spec, kind)]
        print(f"  {name:<12} {spec.summary}")
        print(f"  {'':<12} needs: {spec.needs}" + (f"; commands: {', '.join(extras)}" if extras else ""))
        print(f"  {'':<12} under --concurrency: {'yes' if spec.decoder.batchable else 'no (not batched yet)'}")
        print(f"  {'':<12} draft parameters: {_draft_size(spec.decoder)}")
        for line in describe_options(spec.options):
            print(f"  {'':<14}{name}.{line}")
    print("Tasks:")
    for name in available_tasks():
        print(f"  {name:<12} {describe_task(name)}")
        for line in describe_task_options(name):
            print(f"  {'':<14}{name}.{line}")
    print("Models:")
    for name, spec in EMBEDDED_MODELS.items():
        print(f"  {name:<12} {spec.description} (default)")
    print("  PATH_OR_ID   any local Hugging Face folder or hub id of type llama, mistral or qwen2")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.checks import write_baseline

    baseline = write_baseline(Path(args.run_dir), Path(args.output))
    print(f"Wrote {args.output}: {len(baseline['entries'])} method x task entries "
          f"({baseline['model']}, {baseline['dtype']}, {baseline['device']})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from harness.checks import Tolerances, baseline_machine, compare, machine_note, machine_of, read_baseline
    from harness.results import read_manifest

    baseline = read_baseline(Path(args.baseline))
    run_dir = Path(args.run_dir)
    findings, notes = compare(baseline, run_dir, Tolerances(
        args.tol_accepted_length, args.tol_exact_match, args.tol_rouge2, speed_margin=args.speed_margin,
        speedup_floor=args.speedup_floor),
        force=args.force)
    note = machine_note(baseline_machine(baseline), machine_of(read_manifest(run_dir)), "the baseline and the run")
    for line in ([note] if note else []) + notes:
        print(line)
    table = Table(title=f"check {run_dir} against {args.baseline}", title_justify="left")
    for col in ("method", "task", "metric", "baseline", "current", "limit", "status"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else v if isinstance(v, str) else f"{v:.4f}"  # noqa: E731
    for f in findings:
        table.add_row(f.method, f.task, f.metric, fmt(f.baseline), fmt(f.current), fmt(f.limit),
                      "[green]ok[/]" if f.ok else "[bold red]REGRESSION[/]")
    console = Console() if sys.stdout.isatty() else Console(width=140)
    console.print(table)
    failed = [f for f in findings if not f.ok]
    print(f"{len(failed)} regression(s) in {len(findings)} checks" if failed else f"all {len(findings)} checks passed")
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    from harness.train import train
    from methods.core.training import TrainConfig

    if args.epochs <= 0 or args.batch <= 0 or args.limit <= 0 or args.max_new_tokens <= 0:
        raise UserError("--epochs, --batch, --limit and --max-new-tokens must be positive integers")
    if args.self_prompts < 0 or args.summary_prompts < 0:
        raise UserError("--self-prompts and --summary-prompts must be 0 or more")
    if args.max_steps is not None and args.max_steps < 0:
        raise UserError("--max-steps must be 0 or more (0 only validates the starting weights, e.g. --init-from's)")
    if args.eval_every <= 0 or args.patience <= 0:
        raise UserError("--eval-every and --patience must be positive integers")
    if args.lr <= 0:  # _float already refuses nan and inf
        raise UserError(f"--lr must be a positive finite number, got {args.lr}")
    if not 0 < args.lr_factor < 1 or args.max_lr_cuts < 0:
        raise UserError(f"--lr-factor must lie between 0 and 1 and --max-lr-cuts be 0 or more, "
                        f"got {args.lr_factor:g} and {args.max_lr_cuts}")
    if args.init_from and not os.path.isdir(args.init_from):
        raise UserError(f"--init-from {args.init_from}: no such folder")
    config = TrainConfig(method=args.method, model=args.model, data=args.data, out=args.out, dtype=args.dtype,
                         limit=args.limit, max_new_tokens=args.max_new_tokens, epochs=args.epochs, lr=args.lr,
                         batch_sequences=args.batch, seed=args.seed, allow_eval_data=args.allow_eval_data,
                         max_steps=args.max_steps, eval_every=args.eval_every, patience=args.patience,
                         schedule=args.schedule, lr_factor=args.lr_factor, max_lr_cuts=args.max_lr_cuts,
                         self_prompts=args.self_prompts, summary_prompts=args.summary_prompts,
                         init_from=args.init_from,
                         options=_pairs(args.option, "--option", "KEY=VALUE"))
    train(config, device=args.device)
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_train, "tune": cmd_tune, "analyze": cmd_analyze, "report": cmd_report, "compare": cmd_compare, "list": cmd_list, "baseline": cmd_baseline, "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    from harness.progress import quiet_transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # Ctrl-C outside decoding (model loading, reading data): nothing was written yet, so
        # there is nothing to lose and nothing to show but one line. Decoding handles its own.
        print("\ninterrupted before any results were written; rerun the command to start again", file=sys.stderr)
        return 130
