"""Where decoding runs: one interface, so a run never asks which executor it has.

An executor is built from a ``DecodeSpec`` and owns the decoding processes: the local one
decodes in this process, ``harness/ray_executor.py`` over Ray actors. The run (``harness/
session.py``) describes it once for the manifest, hands it the examples, receives every record
through ``emit`` in this process (the only writer of the results file), asks it for the
divergence verdicts, and closes it. A new executor implements ``Executor`` and gets a branch
in ``make_executor`` and a name in ``harness.config.EXECUTORS``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from harness.config import DecodeSpec, MethodRun, RunConfig
from harness.results import Key
from tasks.base import Example

Emit = Callable[[dict[str, Any]], None]
Progress = Callable[..., Any]  # called with the number of generations (or records) just finished; none: one


class Executor(Protocol):
    where: str        # for the run's first line, e.g. ", 4 Ray workers"; empty for this process
    tokenizer: Any    # the model's tokenizer where this process has it loaded, else None

    def describe(self) -> dict[str, Any]:
        """The manifest's ``model``, ``dtype``, ``methods`` and ``environment`` entries, measured where
        decoding runs (waits for it to be loaded)."""

    def summary(self) -> dict[str, Any] | None:
        """The manifest's ``executor`` entry; None where there is nothing to say beyond ``environment``."""

    def run(self, examples: Sequence[Example], done: Collection[Key], emit: Emit,
            on_progress: Progress | None = None) -> None:
        """Every (example, method), or under load every (example, method, level), not in ``done``
        (keys as ``harness.results.record_key`` makes them) exactly once; each record reaches
        ``emit`` in this process."""

    def divergences(self, records: list[dict[str, Any]], examples: Sequence[Example],
                    on_progress: Progress | None = None) -> list[dict[str, Any]]:
        """``harness.divergence.find_divergences`` on the decoding side's model."""

    def close(self) -> None:
        """Releases the decoding processes; safe to call twice."""


class LocalExecutor:
    """Decodes in this process: one workbench, warmed up once before the first timed generation."""

    where = ""

    def __init__(self, spec: DecodeSpec) -> None:
        from harness.workbench import build_workbench

        self.spec = spec
        self.bench = build_workbench(spec)
        self.tokenizer = self.bench.tokenizer

    def describe(self) -> dict[str, Any]:
        return self.bench.describe()

    def summary(self) -> None:
        return None

    def run(self, examples: Sequence[Example], done: Collection[Key], emit: Emit,
            on_progress: Progress | None = None) -> None:
        from harness.runner import label_of, run_load, run_shard, warm_up

        bench = self.bench
        if self.spec.concurrency is not None:  # each (method, level) warms up on its own batch
            run_load(examples, bench.decoders, bench.tokenizer, bench.settings, self.spec.concurrency,
                     self.spec.request_rate, emit, done, on_progress=on_progress, warmup=self.spec.warmup)
            return
        labels = [label_of(d) for d in bench.decoders]
        if any((e.task, e.id, label) not in done for e in examples for label in labels):
            warm_up(bench.decoders, examples[0], bench.tokenizer, bench.settings, self.spec.warmup)
        run_shard(examples, bench.decoders, bench.tokenizer, bench.settings, emit, done, on_progress=on_progress)

    def divergences(self, records: list[dict[str, Any]], examples: Sequence[Example],
                    on_progress: Progress | None = None) -> list[dict[str, Any]]:
        from harness.divergence import find_divergences

        return find_divergences(records, examples, self.bench.engine, self.bench.tokenizer, on_progress=on_progress)

    def close(self) -> None:
        pass


def make_executor(config: RunConfig, runs: list[MethodRun]) -> Executor:
    """The executor ``config.executor`` names (validated by ``harness.config.validate``), loaded."""
    spec = config.decode_spec(runs)
    if config.executor == "ray":
        from harness.ray_executor import RayExecutor

        return RayExecutor(spec, address=config.ray_address, workers=config.workers,
                           gpus_per_worker=config.gpus_per_worker, threads_per_worker=config.threads_per_worker)
    return LocalExecutor(spec)
