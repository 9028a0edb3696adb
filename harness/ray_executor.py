"""``--executor ray``: the examples of a run spread over Ray actors, one model per actor.

Each actor receives the run's ``DecodeSpec`` (what decoding needs, not the whole
configuration), loads the model and every method once (``build_workbench``) and runs the
examples it is handed through ``run_shard``, methods interleaved per example exactly as a
single process does. The driver hands out one example at a time to whichever actor is
free (examples differ in length, so pulling work balances better than a fixed split), gets
that example's records back, and is the only process that writes the results file: resume,
the writer lock and the manifest work as in a local run.

Under load (``--concurrency``) the unit handed out is a share of the examples instead: each
actor serves its share as its own batch at every level (``run_load``), as a server among
several would. There are as many shares as workers, fewer where that would leave a share with
fewer examples than the highest level (its batch would never be that full).

An actor that dies (a lost node, an OOM kill, ``ray.kill``) loses only the example (or share)
it was running: nothing of it was written, so it is queued again for the actors left, and the
run ends with every example done exactly once. Ray is an optional extra (``pip install -e
".[ray]"``); nothing here imports it until a Ray run starts.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections import deque
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from harness.config import DecodeSpec
from harness.progress import status
from harness.results import Key
from base.errors import UserError
from tasks.base import Example

REPO_ROOT = Path(__file__).resolve().parents[1]


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError('--executor ray needs Ray, which is not installed: pip install -e ".[ray]"') from None
    return ray


def runtime_env() -> dict[str, Any]:
    """Actors import this checkout, not whatever copy of the package their interpreter finds first.

    On other nodes of a cluster the path may not exist; Python then skips it and the
    installed package (the same version, per the README) is used.
    """
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}}


def check_reachable(address: str | None) -> None:
    """A wrong ``--ray-address`` is a one-line error within seconds.

    ``ray.init`` itself retries an unreachable cluster for minutes, logging as it goes.
    """
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address or "")
    if match is None:  # "auto", or no address: Ray finds or starts the cluster itself
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=5).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
                        "`ray start --head` and pass the address it prints") from None


class ShardWorker:
    """A Ray actor's state: one model, every method's decoder, torch limited to its share of threads."""

    def __init__(self, spec: DecodeSpec, threads: int) -> None:
        import torch

        from harness.progress import quiet_transformers
        from harness.workbench import build_workbench

        torch.set_num_threads(threads)
        quiet_transformers()
        self.spec = spec
        self.error: str | None = None
        self.warmed = False
        try:
            self.bench = build_workbench(spec, show_progress=False)  # the driver shows the phase
        except UserError as exc:  # reported by describe() as one line, not as a dead actor's traceback
            self.error = str(exc)

    def describe(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        return {**self.bench.describe(), "pid": os.getpid()}

    def run(self, index: int, example: Example, done: Collection[Key]) -> list[dict[str, Any]]:
        """Every method on one example (``index``: its place in the run, for the method rotation)."""
        from harness.runner import run_shard, warm_up

        bench = self.bench
        if not self.warmed:
            warm_up(bench.decoders, example, bench.tokenizer, bench.settings, self.spec.warmup)
            self.warmed = True
        records: list[dict[str, Any]] = []
        run_shard([example], bench.decoders, bench.tokenizer, bench.settings, records.append, done, start=index)
        return records

    def run_load(self, examples: list[Example], done: Collection[Key]) -> list[dict[str, Any]]:
        """This actor's share of the examples served as its own batch at every level (``run_load``
        warms each method up at each level itself)."""
        from harness.runner import run_load

        bench, spec = self.bench, self.spec
        records: list[dict[str, Any]] = []
        run_load(examples, bench.decoders, bench.tokenizer, bench.settings, spec.concurrency, spec.request_rate,
                 records.append, done, warmup=spec.warmup)
        return records

    def divergences(self, records: list[dict[str, Any]], examples: list[Example]) -> list[dict[str, Any]]:
        from harness.divergence import find_divergences

        return find_divergences(records, examples, self.bench.engine, self.bench.tokenizer)


class RayExecutor:
    """The driver's side (a ``harness.executors.Executor``): starts (or joins) the cluster, owns the actors,
    schedules examples, requeues."""

    tokenizer = None  # the model is loaded in the actors only

    def __init__(self, spec: DecodeSpec, *, address: str | None = None, workers: int | None = None,
                 gpus_per_worker: float = 0.0, threads_per_worker: int | None = None) -> None:
        ray = self.ray = import_ray()
        self.owns_cluster = not ray.is_initialized()
        if self.owns_cluster:
            check_reachable(address)
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
                         runtime_env=runtime_env())
            except ConnectionError as exc:
                raise UserError(f"cannot reach the Ray cluster at {address}: {exc}; start it with "
                                "`ray start --head` and pass the address it prints") from None
        resources = ray.cluster_resources()
        gpus = float(gpus_per_worker or 0)
        if gpus > 0 and resources.get("GPU", 0) < gpus:
            self.close()
            raise UserError(f"--gpus-per-worker {gpus:g}, but the Ray cluster has {resources.get('GPU', 0):g} GPUs")
        default = int(resources.get("GPU", 0) // gpus) if gpus > 0 else int(resources.get("CPU", 1))
        self.workers = workers or max(1, default)
        if self.workers > resources.get("CPU", 0) or self.workers * gpus > resources.get("GPU", 0) + 1e-9:
            self.close()
            raise UserError(f"--workers {self.workers} needs {self.workers} CPUs and {self.workers * gpus:g} GPUs; "
                            f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} "
                            "GPUs")
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // self.workers)
        self.address = address
        self.gpus = gpus
        self.where = f", {self.workers} Ray workers"
        status(f"loading {spec.model} and setting up {len(spec.runs)} methods on {self.workers} Ray workers "
               f"(device {spec.device}, dtype {spec.dtype})")
        actor_class = ray.remote(num_cpus=1, num_gpus=gpus)(ShardWorker)
        self.actors = [actor_class.remote(spec, self.threads) for _ in range(self.workers)]
        self.alive = list(self.actors)
        self.requeued = 0
        self.spec = spec
        self._described: list[dict[str, Any]] = []

    def describe(self) -> dict[str, Any]:
        """Waits for every actor to load; the first one's description stands for the run (all are alike)."""
        try:
            self._described = self.ray.get([a.describe.remote() for a in self.actors])
        except self.ray.exceptions.RayActorError as exc:
            self.close()
            raise UserError(f"a Ray worker died while loading the model: {_first_line(exc)}") from None
        for d in self._described:
            if "error" in d:
                self.close()
                raise UserError(d["error"])
        return self._described[0]

    def summary(self) -> dict[str, Any]:
        return {"kind": "ray", "address": self.address, "workers": self.workers, "threads_per_worker": self.threads,
                "gpus_per_worker": self.gpus,
                "worker_environments": [d.get("environment") for d in self._described]}

    def run(self, examples: Sequence[Example], done: Collection[Key],
            emit: Callable[[dict[str, Any]], None], on_progress: Callable[[int], Any] | None = None) -> None:
        """Every (example, method), or (example, method, level) under load, not in ``done`` exactly
        once; records reach ``emit`` in this process."""
        if not self._described:
            self.describe()
        labels = [label for d in self._described[:1] for label in d["methods"]]
        levels = self.spec.concurrency
        per_example = len(labels) * len(levels or [None])

        def keys(example: Example) -> list[Key]:
            base = [(example.task, example.id, label) for label in labels]
            return base if levels is None else [(*k, level) for k in base for level in levels]

        queue: deque[tuple[int, list[Example]]] = deque()
        if levels is None:
            items = [(index, [example]) for index, example in enumerate(examples)]
        else:
            shares = max(1, min(self.workers, len(examples) // max(levels)))
            items = [(index, list(examples[index::shares])) for index in range(shares)]
        for index, part in items:
            finished = sum(1 for e in part for k in keys(e) if k in done)
            if on_progress is not None and finished:
                on_progress(finished)
            if finished < per_example * len(part):
                queue.append((index, part))
        self._schedule(queue, done, keys, emit, on_progress, per_example)

    def _schedule(self, queue: deque[tuple[int, list[Example]]], done: Collection[Key],
                  keys: Callable[[Example], list[Key]], emit: Callable[[dict[str, Any]], None],
                  on_progress: Callable[[int], Any] | None, per_example: int) -> None:
        """Hands each queued item (one example, or a share under load) to a free actor, requeuing
        the item of an actor that dies."""
        ray = self.ray
        idle = list(self.alive)
        in_flight: dict[Any, tuple[Any, tuple[int, list[Example]]]] = {}
        while queue or in_flight:
            while queue and idle:
                actor, item = idle.pop(0), queue.popleft()
                index, part = item
                mine = {k for e in part for k in keys(e) if k in done}
                ref = (actor.run_load.remote(part, mine) if self.spec.concurrency is not None
                       else actor.run.remote(index, part[0], mine))
                in_flight[ref] = (actor, item)
            if not in_flight:
                left = sum(len(part) for _, part in queue)
                raise UserError(f"every Ray worker died; {left} examples are left: rerun the same command to finish them")
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, item = in_flight.pop(ref)
            try:
                records = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self.alive.remove(actor)
                queue.appendleft(item)
                self.requeued += 1
                what = (f"example {item[1][0].task}/{item[1][0].id}" if self.spec.concurrency is None
                        else f"a share of {len(item[1])} examples")
                print(f"warning: a Ray worker died ({_first_line(exc)}); {what} is queued again, "
                      f"{len(self.alive)} workers left", file=sys.stderr)
                continue
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, UserError):
                    raise UserError(str(exc.cause)) from None
                raise
            for record in records:
                emit(record)
            if on_progress is not None:
                on_progress(per_example * len(item[1]) - sum(1 for e in item[1] for k in keys(e) if k in done))
            idle.append(actor)

    def divergences(self, records: list[dict[str, Any]], examples: Sequence[Example],
                    on_progress: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
        """On one actor, in one call: the bar moves once, when the verdicts are back."""
        if not self.alive:
            raise UserError("every Ray worker died before the divergence check; rerun the same command")
        found = self.ray.get(self.alive[0].divergences.remote(records, list(examples)))
        if on_progress is not None:
            on_progress(len(records))
        return found

    def close(self) -> None:
        """Stops the actors; shuts down the cluster only if this run started it."""
        for actor in getattr(self, "actors", []):
            try:
                self.ray.kill(actor)
            except Exception:  # already dead
                pass
        self.actors = []
        if self.owns_cluster and self.ray.is_initialized():
            self.ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
