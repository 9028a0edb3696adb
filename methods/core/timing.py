"""Timing that is honest on CUDA and costs the decode loop no synchronisation.

Per example, the runner takes one wall-clock interval with the device drained at both
ends (``timed``). Inside ``generate`` the per-step marks are CUDA events on a GPU (read
after the one synchronisation at the end) and ``perf_counter`` on a CPU, so every method,
vanilla included, pays exactly the same for being timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run ``fn`` and return (result, seconds), with queued GPU work drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


class StepClock:
    """Marks between a decode loop's phases; ``seconds()`` gives the intervals between consecutive marks."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if len(self.marks) < 2:
            return []
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")
"""Tensor methods that hand a tensor's values to the host: on a GPU each one waits for the
queued work (a host synchronisation); on a CPU each one is where a GPU run would wait."""


class HostSyncs:
    """Counts, while active, the calls of ``SYNC_METHODS`` on any tensor.

    The decode loop runs inside one, so every method's reads of values on the host (its
    acceptance, a draft built from token ids on the host, an ``if tensor:`` slipped into a
    hot path) show up as host synchronisations per step in the results and the CI gate,
    the same on every machine. Only those few methods are wrapped, and only while a counter
    is active, so ordinary tensor operations pay nothing. Data-dependent shapes (boolean
    masks, ``nonzero``) also wait on a GPU and are not counted."""

    _active: ClassVar[list[HostSyncs]] = []
    _saved: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> HostSyncs:
        if not HostSyncs._active:
            for name in SYNC_METHODS:
                HostSyncs._saved[name] = torch.Tensor.__dict__.get(name)
                setattr(torch.Tensor, name, _counting(name, getattr(torch.Tensor, name)))
        HostSyncs._active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        HostSyncs._active.remove(self)
        if not HostSyncs._active:
            for name, original in HostSyncs._saved.items():
                if original is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)
            HostSyncs._saved.clear()


def _counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        for counter in HostSyncs._active:
            counter.count += 1
        return original(self, *args, **kwargs)

    counted.__name__ = name
    return counted
