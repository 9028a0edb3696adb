"""Results on disk: one JSONL record per (task, example, method), plus ``manifest.json``.

Under load (``run --concurrency``) a record is one (task, example, method, concurrency level):
``record_key`` adds the level to the key of records that carry one.

Records are appended and flushed one at a time so an interrupted run loses at most the
record in flight; a truncated last line (a crash mid-write) is detected and cut off on
resume, with a warning, and that record is simply run again.

A run split with ``--shard I/N`` keeps one results file and one manifest per shard in the
same folder (``results.shard-I-of-N.jsonl``, ``manifest.shard-I-of-N.json``), so shards on
different machines never write the same file; every reader goes through
``read_run_records`` / ``read_manifest``, which merge them and refuse shards that disagree.
Each results file has exactly one writer: ``WriterLock`` (an ``flock`` on a ``.lock`` file
beside it) refuses a second process, and the kernel drops the lock when its holder dies,
so a killed run never blocks its own resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from base.errors import UserError
from base.files import iter_jsonl, read_bytes, read_json, require_shape

RESULTS_FILE = "results.jsonl"
MANIFEST_FILE = "manifest.json"
DIVERGENCES_FILE = "divergences.jsonl"
_SHARD_RE = re.compile(r"^(?P<stem>results|manifest|divergences)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>jsonl|json)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` (1 <= I <= N) as the pair (I, N); a malformed value is a one-line error."""
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index = count = 0
    if not sep or count < 1 or not 1 <= index <= count:
        raise UserError(f"--shard expects I/N with 1 <= I <= N (e.g. --shard 1/4), got {text!r}")
    return index, count


def shard_name(base: str, shard: tuple[int, int] | None) -> str:
    """``results.jsonl`` -> ``results.shard-2-of-4.jsonl`` for shard (2, 4); unchanged without a shard."""
    if shard is None:
        return base
    stem, ext = base.split(".", 1)
    return f"{stem}.shard-{shard[0]}-of-{shard[1]}.{ext}"


def shards_in(run_dir: Path) -> list[tuple[int, int]]:
    """The shards that have a manifest or a results file in ``run_dir``, sorted."""
    found = set()
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            m = _SHARD_RE.match(path.name)
            if m and m["stem"] in ("results", "manifest"):
                found.add((int(m["i"]), int(m["n"])))
    return sorted(found, key=lambda s: (s[1], s[0]))


def _part_files(run_dir: Path, base: str) -> list[Path]:
    """The unsharded file and every shard's file of kind ``base`` that exist, in shard order."""
    paths = [run_dir / base] if (run_dir / base).is_file() else []
    paths += [run_dir / shard_name(base, s) for s in shards_in(run_dir) if (run_dir / shard_name(base, s)).is_file()]
    return paths


Key = tuple[str, ...]  # (task, example id, method), and the concurrency level under load


def record_key(record: dict[str, Any]) -> Key:
    """(task, example id, method), and the concurrency level for a record made under load: the
    same example and method at two levels are two measurements, each done once."""
    key = (record["task"], record["example_id"], record["method"])
    return key if record.get("concurrency") is None else (*key, record["concurrency"])


def key_text(key: Key) -> str:
    """A key in words, for an error message."""
    level = f" at concurrency {key[3]}" if len(key) > 3 else ""
    return f"{key[2]} on {key[0]} example {key[1]}{level}"


RESULTS_HINT = "fix or delete that line (it will be run again), or rerun with --overwrite"
_RECORD_SHAPE = {"task": str, "example_id": (str, int), "method": str}
_RECORD_OPTIONAL = {"concurrency": int, "load": dict}  # records made under load
_DONE_SHAPE = {"turns": list, "new_tokens": int, "wall_time": (int, float), "target_forwards": int}
_TURN_SHAPE = {"tokens": list, "text": str, "accepted": list, "draft_sizes": list}
# per-step lists that records written before they existed lack: typed where present, never required
_TURN_OPTIONAL = {"draft_depths": list, "accepted_drafts": list}


def check_record(record: Any, where: str) -> dict[str, Any]:
    """A record has the keys and types metrics read; anything else would be a KeyError deep in pandas."""
    require_shape(record, {**_RECORD_SHAPE, **_RECORD_OPTIONAL, **_DONE_SHAPE}, where, RESULTS_HINT)
    needed = list(_RECORD_SHAPE) + ([] if record.get("skipped") else list(_DONE_SHAPE))
    missing = [k for k in needed if record.get(k) is None]
    if missing:
        raise UserError(f"{where}: record lacks {', '.join(repr(k) for k in missing)}; {RESULTS_HINT}")
    for i, turn in enumerate(record.get("turns") or [], start=1):
        require_shape(turn, {**_TURN_SHAPE, **_TURN_OPTIONAL}, f"{where} (turn {i})", RESULTS_HINT)
        steps = len(turn.get("accepted") or [])
        for key in ("draft_depths", "accepted_drafts"):  # read step by step beside ``accepted``
            if isinstance(turn.get(key), list) and len(turn[key]) != steps:
                raise UserError(f"{where}: turn {i} has {len(turn[key])} {key} for {steps} steps; {RESULTS_HINT}")
        lacking = [k for k in _TURN_SHAPE if k not in turn]
        if lacking:
            raise UserError(f"{where}: turn {i} lacks {', '.join(repr(k) for k in lacking)}; {RESULTS_HINT}")
    return record


def read_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read a results file; an undecodable, malformed or misshapen line names the file and line number."""
    if not path.exists():
        return []
    data = read_bytes(path, "pass a run folder written by `run`")
    cut = data.rfind(b"\n") + 1
    try:  # complete lines first: a UTF-16 or binary file is not "truncated", it is the wrong file
        data[:cut].decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{lineno}: cannot decode byte 0x{data[exc.start]:02x} (not UTF-8 JSON lines: "
                        f"UTF-16 or binary?); {RESULTS_HINT}") from None
    if data and not data.endswith(b"\n"):
        if not repair:
            raise UserError(f"{path}: the last line is truncated (an interrupted run?); rerun `run` to repair it")
        print(f"warning: {path}: dropping a truncated last record (it will be run again)", file=sys.stderr)
        try:
            with path.open("r+b") as fh:
                fh.truncate(cut)
        except OSError as exc:
            raise UserError(f"cannot repair {path} ({exc.strerror}); make it writable or use another --out") from None
    records, seen = [], {}
    for lineno, rec in iter_jsonl(path, RESULTS_HINT):
        key = record_key(check_record(rec, f"{path}:{lineno}"))
        if key in seen:  # two records of one key would pair with each other and skew every metric
            raise UserError(f"{path}: lines {seen[key]} and {lineno} both hold {key_text(key)}; delete one of "
                            "them (two runs wrote to one folder?)")
        seen[key] = lineno
        records.append(rec)
    return records


def read_run_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run folder: the unsharded results file and all shard files, merged.

    A (task, example, method) key in two files means two writers decoded the same work; the
    metrics would count it twice, so that is refused rather than silently de-duplicated.
    """
    records: list[dict[str, Any]] = []
    seen: dict[Key, Path] = {}
    for path in _part_files(run_dir, RESULTS_FILE):
        for record in read_records(path):
            key = record_key(record)
            if key in seen:
                raise UserError(f"{run_dir}: record {'/'.join(map(str, key))} is in both {seen[key].name} and "
                                f"{path.name}; delete one of the two files' copies")
            seen[key] = path
            records.append(record)
    return records


def read_run_divergences(run_dir: Path) -> list[dict[str, Any]]:
    """Divergence entries of the unsharded run and of every shard, merged."""
    out: list[dict[str, Any]] = []
    for path in _part_files(run_dir, DIVERGENCES_FILE):
        out.extend(row for _, row in iter_jsonl(path, "delete it and rerun `run` to recompute it"))
    return out


def _holder_pid(fd: int, wait_s: float = 1.0) -> str:
    """The pid the lock's holder wrote, waiting briefly for it.

    A holder writes its pid just after it takes the lock, so a second run that starts at the
    same moment can find the lock taken and the file still empty; polling for a moment lets the
    refusal name the process to stop instead of saying "unknown".
    """
    deadline = time.monotonic() + wait_s
    while True:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if holder or time.monotonic() >= deadline:
            return holder or "unknown"
        time.sleep(0.01)


class WriterLock:
    """One writer per results file: an exclusive ``flock`` on ``<results>.lock``, which holds the pid.

    ``flock`` locks die with their process, so a run killed with SIGKILL leaves a lock file
    that no longer locks anything and its resume proceeds. The lock file itself is left in
    place: deleting it would let a third process lock a fresh inode while a second still
    holds the old one.
    """

    def __init__(self, results_path: Path) -> None:
        self.path = results_path.with_name(results_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot create lock file {self.path}: {exc.strerror}; choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = _holder_pid(fd)
            os.close(fd)
            results = self.path.name.removesuffix(".lock")
            raise UserError(f"another run (pid {holder}) is writing {self.path.parent / results}; wait for it to "
                            "finish or stop it, or use another --out (or another --shard)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class ResultsWriter:
    """Append-only JSONL sink; each record is flushed and fsynced before the next starts.

    It takes the file's ``WriterLock`` unless the caller already holds it (``locked=True``:
    ``execute`` locks before it reads what is done, so no other process can write between
    that read and these appends).
    """

    def __init__(self, path: Path, *, locked: bool = False) -> None:
        self.path = path
        self._lock = None if locked else WriterLock(path).acquire()
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MANIFEST_HINT = "the run folder is damaged; rerun `run` with --overwrite to start afresh"
_MANIFEST_SHAPE = {"config": dict, "tasks": dict, "method_options": dict, "methods": dict, "environment": dict,
                   "model": dict, "dtype": str}


def load_manifest_file(path: Path) -> dict[str, Any]:
    """``manifest.json`` parsed and shape-checked: a list, or a ``config`` that is a string, is one line."""
    manifest = read_json(path, MANIFEST_HINT)
    require_shape(manifest, _MANIFEST_SHAPE, str(path), MANIFEST_HINT, allow_null=False)
    require_shape(manifest.get("config") or {}, {"identity": dict, "methods": list, "model": str},
                  f"{path} (config)", MANIFEST_HINT)
    for name, info in (manifest.get("tasks") or {}).items():
        require_shape(info, {"hash": str}, f"{path} (task {name!r})", MANIFEST_HINT)
    for name, opts in (manifest.get("method_options") or {}).items():
        require_shape(opts, {}, f"{path} (options of {name!r})", MANIFEST_HINT)
    return manifest


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's manifest; for a sharded run, the shards' manifests merged into one.

    Shards must agree on the configuration identity, the task hashes and each method's
    options, or their records would not mean the same thing; a disagreement is a one-line
    error. The merged manifest keeps the first shard's environment as ``environment`` and
    every shard's under ``shards``; it is ``complete`` only when all N shards are.
    """
    parts = _part_files(run_dir, MANIFEST_FILE)
    if not parts:
        raise UserError(f"{run_dir} is not a run directory (no {MANIFEST_FILE}); pass the --out folder of a `run`")
    if len(parts) == 1 and parts[0].name == MANIFEST_FILE:
        return load_manifest_file(parts[0])
    if parts[0].name == MANIFEST_FILE:
        raise UserError(f"{run_dir} mixes an unsharded run with shard files; keep one kind per folder")
    manifests = [(p, load_manifest_file(p)) for p in parts]
    counts = {int(_SHARD_RE.match(p.name)["n"]) for p, _ in manifests}
    if len(counts) > 1:
        raise UserError(f"{run_dir} holds shards of different splits (N = {', '.join(map(str, sorted(counts)))}); "
                        "keep one --shard I/N split per folder")
    first_path, merged = manifests[0]
    merged = json.loads(json.dumps(merged))
    identity = merged.get("config", {}).get("identity")
    hashes = {k: v.get("hash") for k, v in merged.get("tasks", {}).items()}
    shards = []
    for path, m in manifests:
        if m.get("config", {}).get("identity") != identity:
            diff = sorted(k for k in {**(identity or {}), **m.get("config", {}).get("identity", {})}
                          if (identity or {}).get(k) != m.get("config", {}).get("identity", {}).get(k))
            raise UserError(f"{run_dir}: {path.name} and {first_path.name} disagree on the configuration "
                            f"(differs in: {', '.join(diff)}); move the odd shard to its own folder")
        if {k: v.get("hash") for k, v in m.get("tasks", {}).items()} != hashes:
            raise UserError(f"{run_dir}: {path.name} and {first_path.name} disagree on the task hash (different "
                            "examples); move the odd shard to its own folder")
        for label, options in m.get("method_options", {}).items():
            if merged.setdefault("method_options", {}).setdefault(label, options) != options:
                raise UserError(f"{run_dir}: {path.name} and {first_path.name} ran {label!r} with different "
                                "options; move the odd shard to its own folder")
        merged.setdefault("methods", {}).update({k: v for k, v in m.get("methods", {}).items()
                                                 if k not in merged["methods"]})
        labels = merged.setdefault("config", {}).setdefault("methods", [])
        labels.extend(x for x in m.get("config", {}).get("methods", []) if x not in labels)
        shards.append({"shard": m.get("config", {}).get("shard"), "file": path.name, "status": m.get("status"),
                       "environment": m.get("environment"), "started": m.get("started"),
                       "finished": m.get("finished")})
    (count,) = counts
    complete = len(manifests) == count and all(s["status"] == "complete" for s in shards)
    merged["status"] = "complete" if complete else f"partial ({len(manifests)} of {count} shards present" + (
        ")" if len(manifests) < count else ", not all complete)")
    merged["shards"] = shards
    merged["config"].pop("shard", None)
    return merged


def write_manifest(run_dir: Path, manifest: dict[str, Any], name: str = MANIFEST_FILE) -> None:
    tmp = run_dir / (name + ".tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(run_dir / name)
    except OSError as exc:
        raise UserError(f"cannot write {run_dir / name} ({exc.strerror}); check the folder's "
                        "permissions and free space") from None


def iter_turns(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from record.get("turns", [])
