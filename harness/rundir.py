"""A run folder: its default name, its creation, and the checks that let a rerun resume it.

A folder is reopened only for the same examples and meaning (``RunConfig.identity``) and the
same options per method label; every shard's manifest in it is checked, so a shard started
with another configuration is refused before it decodes anything.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from harness.config import MethodRun, RunConfig, complete_options
from harness.results import (
    DIVERGENCES_FILE,
    MANIFEST_FILE,
    RESULTS_FILE,
    load_manifest_file,
    read_records,
    Key,
    record_key,
    shard_name,
    shards_in,
)
from base.errors import UserError


def default_out_dir(config: RunConfig) -> Path:
    slug = Path(config.model).name.replace(" ", "_") or "model"
    return Path("runs") / f"{slug}-{config.dtype}-{config.identity_hash()}"


def prepare_out_dir(config: RunConfig, out: Path, task_info: dict[str, dict[str, Any]],
                    runs: list[MethodRun]) -> tuple[set[Key], dict[str, Any]]:
    """Reopen the run folder (made by ``make_out_dir``, locked by the caller); return the keys already done
    (resume) and this shard's old manifest. Other shards' manifests in the folder are checked too, so a
    shard started with another configuration is refused before it decodes anything."""
    manifest_path = out / shard_name(MANIFEST_FILE, config.shard)
    results_path = out / shard_name(RESULTS_FILE, config.shard)
    if config.overwrite:
        for p in (manifest_path, results_path, out / shard_name(DIVERGENCES_FILE, config.shard)):
            p.unlink(missing_ok=True)
    others = [s for s in shards_in(out) if s != config.shard]
    if config.shard is None and others:
        raise UserError(f"{out} holds a sharded run (--shard I/{others[0][1]}); add --shard, or use another --out")
    if config.shard is not None:
        if (out / MANIFEST_FILE).exists() or (out / RESULTS_FILE).exists():
            raise UserError(f"{out} holds an unsharded run; run the shards in another --out")
        if any(n != config.shard[1] for _, n in others):
            raise UserError(f"{out} holds shards of another split (--shard I/{others[0][1]}); use that N, "
                            "or another --out")
    if config.overwrite:
        manifest_paths = []
    else:
        manifest_paths = [manifest_path] if manifest_path.exists() else []
    manifest_paths += [out / shard_name(MANIFEST_FILE, s) for s in others
                       if (out / shard_name(MANIFEST_FILE, s)).exists()]
    old: dict[str, Any] = {}
    for path in manifest_paths:
        found = load_manifest_file(path)
        _check_compatible(config, out, path, found, task_info, runs)
        if path == manifest_path:
            old = found
    if not manifest_path.exists() and results_path.exists():
        raise UserError(f"{out} has {results_path.name} but no {manifest_path.name}; use another --out or --overwrite")
    return {record_key(r) for r in read_records(results_path, repair=True)}, old


def _check_compatible(config: RunConfig, out: Path, path: Path, old: dict[str, Any],
                      task_info: dict[str, dict[str, Any]], runs: list[MethodRun]) -> None:
    """A manifest already in the folder must describe the same examples and the same method options."""
    if path.name != MANIFEST_FILE:
        out = path  # name the shard's manifest: the folder is fine, one shard in it is not
    if old.get("config", {}).get("identity") != config.identity():
        diff = sorted(k for k, v in config.identity().items()
                      if old.get("config", {}).get("identity", {}).get(k) != v)
        raise UserError(
            f"{out} holds results of a different configuration (differs in: {', '.join(diff)}); "
            "use another --out, or --overwrite to discard them"
        )
    old_hashes = {k: v.get("hash") for k, v in old.get("tasks", {}).items()}
    if old_hashes and old_hashes != {k: v["hash"] for k, v in task_info.items()}:
        raise UserError(
            f"{out} holds results for different examples (task hash changed: the data files differ); "
            "use another --out, or --overwrite to discard them"
        )
    for run in runs:
        before = old.get("method_options", {}).get(run.label)
        if before is not None:  # a folder written before an option existed resumes under its default
            before = complete_options(run.label, before)
        if before is not None and before != jsonable(run.options_dict()):
            diff = sorted(k for k, v in jsonable(run.options_dict()).items() if before.get(k) != v)
            raise UserError(
                f"{out} holds {run.label!r} results made with other options (differs in: {', '.join(diff)}); "
                f"name the new setting as a variant (e.g. {run.name}@{diff[0]}=...), use another --out, "
                "or --overwrite to discard them")


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out}: {exc.strerror}; choose another --out") from None
    try:  # a real probe: os.access says yes to root even where writes fail (read-only mounts, /proc)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise UserError(f"output directory {out} is not writable ({exc.strerror}); choose another --out") from None


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), so options compare with a manifest's."""
    return json.loads(json.dumps(value))
