"""The machine a number was measured on, and the memory-bandwidth limit of a decode step there.

A batch-1 decode step reads every weight it uses from memory once, plus the KV cache, so
no decoder, vanilla included, can take a step faster than those bytes over the machine's
read bandwidth. Holding the baseline's step time against that limit tells how much of a
speedup is the method and how much is a slow baseline ("Speculative Decoding: Performance
or Illusion?", arXiv 2601.11580). And a speedup measured on one machine does not carry over
to another (a method tuned where a tree pass is cheap can lose where it is dear), so
every result names the machine: CPU model and vector units, or GPU name, and threads.

Nothing here imports the harness; ``harness/environment.py`` records ``machine`` and the
bandwidth in every manifest, ``benchmarks/roofline.py`` prints the limit beside each method.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods.core.cost import LOADED_SHARE, OtherLoad, measurement_path, read_measurement, store_measurement

# the vector units that decide which kernels (and so which dtype) are fast, weakest first,
# with the /proc/cpuinfo flags that announce each
UNIT_FLAGS: dict[str, tuple[str, ...]] = {
    "AVX2": ("avx2",),
    "AVX512": ("avx512f",),
    "AVX512-BF16": ("avx512_bf16",),
    "AMX": ("amx_bf16", "amx_tile"),
}
BANDWIDTH_VERSION = 1  # bump when the measurement changes, so cached figures re-measure
BUFFER_BYTES = 1 << 30  # far larger than any last-level cache: the reads come from DRAM


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def vector_units(cpuinfo: str | None = None) -> list[str]:
    """Which of AVX2, AVX512, AVX512-BF16 and AMX the CPU has, from the first ``flags`` line of
    /proc/cpuinfo (``cpuinfo`` replaces the file, for tests); empty where there is none."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    return [unit for unit, names in UNIT_FLAGS.items() if flags & set(names)]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix units, where bf16 beats float32 (benchmarks/dtype_speed.py).

    torch's own probes (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``)
    answer where they exist, since they also see what the OS enabled; the cpuinfo flags otherwise."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if any(p is not None for p in probes):
        return any(bool(p()) for p in probes if p is not None)
    return bool({"AVX512-BF16", "AMX"} & set(vector_units()))


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device | str) -> dict[str, Any]:
    """What a speed depends on beyond the model and method: the processor that runs the step
    (CPU model and vector units, or GPU name and compute capability), cores, torch threads and
    torch version."""
    device = torch.device(device)
    common = {"cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"kind": "cuda", "name": torch.cuda.get_device_name(device), **common,
                "capability": f"{major}.{minor}"}
    return {"kind": "cpu", "name": cpu_name(), "vector_units": vector_units(), **common,
            "capability": torch.backends.cpu.get_cpu_capability()}


def machine_label(m: dict[str, Any]) -> str:
    """For humans: "AMD EPYC (AVX2), 2 threads" (the strongest vector unit names the class of
    CPU) or "NVIDIA H200". Missing entries (older manifests) are left out."""
    if m.get("kind") == "cuda":
        return str(m.get("name") or "GPU")
    units = m.get("vector_units")
    label = str(m.get("name") or "CPU") + (f" ({units[-1]})" if units else "")
    return label + (f", {m['threads']} threads" if m.get("threads") else "")


@dataclass(frozen=True)
class Bandwidth:
    """A measured read bandwidth, the kernel that reached it, and the share of the cores other
    processes kept busy meanwhile (None where unknown)."""

    gbs: float
    kernel: str
    load: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Each reads the whole buffer once, and the fastest of them counts: depending on the CPU's vector
# units one of these reductions keeps up with memory while others (a bf16 view's sum, an int32 sum
# that widens every element) are compute-bound and would understate the bandwidth.
CPU_READS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "float32 sum": lambda x: x.sum(),
    "int64 sum": lambda x: x.view(torch.int64).sum(),
    "float32 amax": lambda x: torch.amax(x),
}


@torch.no_grad()
def measure_read_bandwidth(device: torch.device | str, *, rounds: int = 4,
                           nbytes: int = BUFFER_BYTES) -> Bandwidth:
    """A fresh measurement, no cache. CPU: each of ``CPU_READS`` over ``nbytes`` with the run's
    torch threads, rounds interleaved, the fastest round of the fastest kernel (other work
    only ever slows a round down). GPU: a device-to-device copy, read and written bytes both
    counted, synchronised, the fastest round."""
    device = torch.device(device)
    x = torch.empty(nbytes // 8 * 2, dtype=torch.float32, device=device).fill_(1.0)  # written: every page is real
    if device.type == "cuda":
        y = torch.empty_like(x)
        reads: dict[str, Callable[[torch.Tensor], Any]] = {"device copy": lambda t: y.copy_(t)}
        moved = 2 * x.numel() * x.element_size()
    else:
        reads, moved = CPU_READS, x.numel() * x.element_size()
    best = {name: float("inf") for name in reads}
    with OtherLoad() as load:
        for r in range(rounds + 1):
            for name, read in reads.items():
                _sync(device)
                start = time.perf_counter()
                read(x)
                _sync(device)
                if r:  # round 0 warms every kernel up
                    best[name] = min(best[name], time.perf_counter() - start)
    kernel = min(best, key=best.__getitem__)
    return Bandwidth(moved / best[kernel] / 1e9, kernel, load.share if device.type == "cpu" else None)


def _fingerprint(device: torch.device) -> str:
    return json.dumps({**machine(device), "measurement": BANDWIDTH_VERSION}, sort_keys=True)


_MEMO: dict[str, float] = {}


def read_bandwidth_gbs(device: torch.device | str, *, cache_dir: Path | None) -> float:
    """The machine's memory read bandwidth in GB/s: from memory, from
    ``cache_dir/hardware/<fingerprint hash>.json``, or measured (about a second) and cached.

    As with the cost curve, a figure measured while other processes kept a quarter of the
    cores busy or more is that moment's, not the machine's: used for this run, not cached.
    A GPU's copy runs on the device, where the host's load does not slow it."""
    device = torch.device(device)
    key = _fingerprint(device)
    if key in _MEMO:
        return _MEMO[key]
    path = measurement_path(cache_dir, "hardware", key)
    stored = read_measurement(path)
    if stored is not None:
        try:
            _MEMO[key] = float(stored["read_gbs"])
            return _MEMO[key]
        except (ValueError, KeyError, TypeError):
            pass
    found = measure_read_bandwidth(device)
    _MEMO[key] = found.gbs
    if found.load is not None and found.load >= LOADED_SHARE:
        print(f"warning: other processes kept {found.load:.0%} of the cores busy while the read bandwidth was "
              "measured; using it for this run only, not caching it", file=sys.stderr)
    else:
        store_measurement(path, {"read_gbs": round(found.gbs, 3), "kernel": found.kernel,
                                 "load": None if found.load is None else round(found.load, 2),
                                 "machine": json.loads(key)})
    return found.gbs


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters one decode step reads: every parameter once (shared storages once),
    except the input embedding table, of which a step reads one row, unless it is tied to
    the LM head, where the head reads all of it."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    seen: set[Any] = set()
    total = 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel()) if p.data_ptr() else id(p)
        if key in seen:
            continue
        seen.add(key)
        if p.data_ptr() == embed.data_ptr() and not tied:
            total += embed.shape[-1] * embed.element_size()  # the one row this step's token looks up
        else:
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of KV cache one cached token adds to every step's reads: layers x (K and V) x
    KV heads x head dim x element size (the engine's cache holds the model's dtype)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element


def decode_step_bytes(model: torch.nn.Module, context: int) -> int:
    """Bytes one decode step must read after ``context`` cached tokens: the weights it uses
    and the KV cache."""
    return step_weight_bytes(model) + kv_bytes_per_token(model) * context


def step_limit_ms(step_bytes: int | float, gbs: float) -> float:
    """The fastest a step reading ``step_bytes`` can be at ``gbs`` GB/s, in milliseconds."""
    return step_bytes / (gbs * 1e9) * 1e3
