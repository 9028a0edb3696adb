"""The ``run`` command end to end: validate, load tasks, open the run folder, decode, judge divergences.

All validation that can fail on user input happens *before* the model loads, so a typo
costs a second, not a model load. The parts live apart: the configuration and its checks in
``harness/config.py``, the run folder and resume checks in ``harness/rundir.py``, decoding
behind one ``Executor`` (``harness/executors.py``: this process, or Ray actors).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.config import MethodRun, RunConfig, validate
from harness.executors import make_executor
from harness.progress import bar
from harness.results import (
    DIVERGENCES_FILE,
    MANIFEST_FILE,
    RESULTS_FILE,
    ResultsWriter,
    WriterLock,
    read_records,
    shard_name,
    write_manifest,
)
from harness.rundir import default_out_dir, jsonable, make_out_dir, prepare_out_dir
from base.errors import UserError
from methods.registry import get_spec
from tasks.base import Example, TaskOptions, load_task, split_spec, task_hash


def load_examples(config: RunConfig) -> tuple[list[Example], dict[str, dict[str, Any]]]:
    options = TaskOptions(
        data_dir=Path(config.data_dir) if config.data_dir else None,
        paths={k: Path(v) for k, v in config.task_paths.items()},
        limit=config.limit,
        seed=config.seed,
        extra=config.task_options,
    )
    examples: list[Example] = []
    info: dict[str, dict[str, Any]] = {}
    owner: dict[tuple[str, str], str] = {}  # (source, id) -> the --tasks entry that selected it
    for spec in config.tasks:
        chosen = load_task(spec, options)
        name, _ = split_spec(spec)
        for e in chosen:
            other = owner.setdefault((e.source, e.id), spec)
            if other != spec:
                raise UserError(f"--tasks entries {other!r} and {spec!r} both select example {e.id}; an example "
                                "must be counted once: merge them into one entry")
        # Examples carry the full spec as their task so categories selections stay apart.
        chosen = [Example(e.id, e.category, e.turns, e.reference, e.source, spec) for e in chosen]
        examples.extend(chosen)
        info[spec] = {"suite": name, "hash": task_hash(chosen), "examples": len(chosen),
                      "source": chosen[0].source}
    return examples, info


def check_concurrency_fits(config: RunConfig, examples: list[Example]) -> None:
    """Refuse a load level this process's examples cannot fill, before the model loads.

    With fewer requests than the level, the batch never holds that many, and the measurement
    would be labelled with a load it never had.
    """
    if config.concurrency is None:
        return
    count = len(shard_examples(examples, config.shard))
    level = max(config.concurrency)
    if level <= count:
        return
    shard = f" in shard {config.shard[0]}/{config.shard[1]}" if config.shard else ""
    limit = f"--limit {config.limit} per task" if config.limit is not None else "no --limit"
    raise UserError(f"--concurrency {level} is more than the {count} examples selected{shard} ({limit}); "
                    f"lower the level or select more examples (--limit, --tasks)")


def check_fits_context(config: RunConfig, examples: list[Example]) -> None:
    """Refuse, before the weights load, a run in which no generation could happen.

    The context length comes from the model's config and prompt lengths from its tokenizer,
    both read in about a second; otherwise every example would be skipped and the run would
    end "successfully" with nothing done.
    """
    from harness.models import context_length, load_tokenizer, model_config
    from methods.core.prompts import encode_conversation

    context = context_length(model_config(config.model))
    if context is None:
        return
    if config.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {config.max_new_tokens} does not fit the model's context of {context} "
                        f"tokens (prompt included); use at most {context - 1}, well below it to leave room for prompts")
    tokenizer = load_tokenizer(config.model)
    shortest = min(len(encode_conversation(tokenizer, [{"role": "user", "content": e.turns[0]}])) for e in examples)
    if shortest + config.max_new_tokens > context:
        raise UserError(f"every prompt is too long for the model's context of {context} tokens: the shortest is "
                        f"{shortest} tokens + {config.max_new_tokens} new; lower --max-new-tokens to at most "
                        f"{max(context - shortest, 0)} or use shorter prompts (e.g. --task-option xsum.max_words=N)")


def shard_examples(examples: list[Example], shard: tuple[int, int] | None) -> list[Example]:
    """The I-th of N parts: every N-th example of the selection, starting at the I-th.

    The selection itself (``--limit`` sampling included) is seeded, so every shard process
    computes the same list and the parts are disjoint and cover it; the task hash, over the
    whole selection, is what shards are checked to share.
    """
    if shard is None:
        return examples
    index, count = shard
    return examples[index - 1::count]


CONTEXT_RULE = "median prompt tokens (first turn, up to 64 examples) + half of max_new_tokens"


def decode_limit(config: RunConfig, examples: list[Example], model: dict[str, Any], env: dict[str, Any],
                 tokenizer: Any = None) -> dict[str, Any] | None:
    """The bytes a vanilla step reads at a representative context and the fastest such a step
    can be at the machine's read bandwidth (``methods/core/hardware.py``): the report holds
    the baseline's measured step against it. None where the description lacks either figure."""
    from statistics import median

    from harness.models import load_tokenizer
    from methods.core.hardware import step_limit_ms
    from methods.core.prompts import encode_conversation

    gbs = env.get("read_bandwidth_gbs")
    if not gbs or model.get("step_weight_bytes") is None or not examples:
        return None
    tokenizer = tokenizer or load_tokenizer(config.model)
    prompt = int(median(len(encode_conversation(tokenizer, [{"role": "user", "content": e.turns[0]}]))
                        for e in examples[:64]))
    context = prompt + config.max_new_tokens // 2
    step = model["step_weight_bytes"] + model["kv_bytes_per_token"] * context
    return {"context": context, "context_rule": CONTEXT_RULE, "step_bytes": step, "read_bandwidth_gbs": gbs,
            "step_limit_ms": round(step_limit_ms(step, gbs), 3)}


def execute(config: RunConfig) -> Path:
    """Run the benchmark described by ``config``; returns the run folder.

    The results file is locked before anything is read from it, and stays locked to the end:
    what is done, and so what is left, cannot change under this process.
    """
    runs = validate(config)
    examples, task_info = load_examples(config)
    check_concurrency_fits(config, examples)
    for run in runs:
        get_spec(run.name).decoder.check_ready(config.model, run.options)
    check_fits_context(config, examples)
    out = Path(config.out) if config.out else default_out_dir(config)
    make_out_dir(out)
    results_path = out / shard_name(RESULTS_FILE, config.shard)
    with WriterLock(results_path):
        return _execute_locked(config, runs, shard_examples(examples, config.shard), task_info, out, results_path)


def with_guard_totals(methods: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The methods' manifest entries with each rate guard's decisions over this file's timed
    generations, in place of the counts ``describe()`` gave at setup (before any step): the
    fit's step cost stays, the drafted and plain steps become what the run did."""
    from harness.metrics import guard_by_method  # pandas: only once a run is done

    totals = guard_by_method(records)
    out = dict(methods)
    for label, info in methods.items():
        guard = (info or {}).get("guard")
        if guard is not None:
            kept = {k: v for k, v in guard.items() if k in ("step_cost", "window")}
            out[label] = {**info, "guard": {**kept, **totals.get(label, {"drafted_steps": 0, "plain_steps": 0, "probes": 0}),
                                            "counted": "timed generations of the records"}}
    return out


def merged_costs(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """A resumed run's cost record: what this invocation used, beside what earlier ones recorded."""
    if not old or not new:
        return new or old
    return {**old, **new, "calls": {**(old.get("calls") or {}), **(new.get("calls") or {})}}


def _execute_locked(config: RunConfig, runs: list[MethodRun], examples: list[Example],
                    task_info: dict[str, dict[str, Any]], out: Path, results_path: Path) -> Path:
    done, old_manifest = prepare_out_dir(config, out, task_info, runs)
    manifest_name = shard_name(MANIFEST_FILE, config.shard)
    executor = make_executor(config, runs)
    try:
        described = executor.describe()
        labels = list(dict.fromkeys([*old_manifest.get("config", {}).get("methods", []), *(r.label for r in runs)]))
        summary = executor.summary()
        manifest = {
            "config": {**asdict(config), "methods": labels, "identity": config.identity()},
            "model": {"name": config.model, **described["model"]},
            "dtype": described["dtype"],
            "tasks": task_info,
            "methods": {**old_manifest.get("methods", {}), **described["methods"]},
            "method_options": {**old_manifest.get("method_options", {}),
                               **{r.label: jsonable(r.options_dict()) for r in runs}},
            "environment": described["environment"],
            "costs": merged_costs(old_manifest.get("costs"), described.get("costs")),
            "decode_limit": decode_limit(config, examples, described["model"], described["environment"],
                                         executor.tokenizer),
            **({"executor": summary} if summary is not None else {}),
            "started": old_manifest.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
        }
        write_manifest(out, manifest, manifest_name)

        n_methods = len(runs)
        levels: list[int | None] = list(config.concurrency) if config.concurrency is not None else [None]
        todo = len(examples) * n_methods * len(levels)
        already = sum(1 for e in examples for r in runs for level in levels
                      if ((e.task, e.id, r.label) if level is None else (e.task, e.id, r.label, level)) in done)
        part = f" x {len(levels)} concurrency levels" if config.concurrency is not None else ""
        part += f", shard {config.shard[0]}/{config.shard[1]}" if config.shard else ""
        if config.chosen_methods:
            print(f"No --methods given: comparing every method ready for {config.model}: "
                  f"{', '.join(r.label for r in runs)} ({config.limit} examples per task, {config.max_new_tokens} "
                  "new tokens; --methods, --limit and --max-new-tokens choose otherwise)", file=sys.stderr)
        print(f"Run folder: {out}  ({len(examples)} examples x {n_methods} methods{part}{executor.where}, "
              f"{already} already done)", file=sys.stderr)
        completed = already
        try:
            with ResultsWriter(results_path, locked=True) as writer, bar("decoding", todo, "gen") as progress:
                def emit(record: dict[str, Any]) -> None:
                    nonlocal completed
                    writer.write(record)
                    completed += 1

                executor.run(examples, done, emit, on_progress=progress.update)
        except KeyboardInterrupt:
            manifest["status"] = "interrupted"
            write_manifest(out, manifest, manifest_name)
            print(f"\nInterrupted: {completed} of {todo} generations are saved in {results_path}; "
                  "rerun the same command to finish the rest.", file=sys.stderr)
            raise SystemExit(130) from None

        records = read_records(results_path)
        with bar("divergence verdicts", len(records), "record") as progress:
            divergences = executor.divergences(records, examples, on_progress=progress.update)
    finally:
        executor.close()
    (out / shard_name(DIVERGENCES_FILE, config.shard)).write_text("".join(json.dumps(d) + "\n" for d in divergences))
    manifest["methods"] = with_guard_totals(manifest["methods"], records)
    manifest["status"] = "complete"
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_manifest(out, manifest, manifest_name)
    return out
