"""Checkpoint integrity: per-rank manifests written last, verified before anything is loaded.

Under Ray Train V2 every rank saves into its own staging directory and reports it; Ray merges
the directories into one checkpoint (RAY_DEEPSPEED_NOTES.md pitfall 4). So every rank writes
``catdpo_manifest.rank<k>.json`` listing the files *it* wrote (relative path, size, sha256) and
the world size, as the last file of its save. A checkpoint is trusted only when the manifests
of all ``world_size`` ranks are present, agree on run id and step, and every listed file has
its recorded size and hash; files nobody listed are refused too (DeepSpeed loads files by name,
and a stray ``.pt`` must not ride along). ``choose_checkpoint`` falls back to the newest good one.

Loading: DeepSpeed 0.19.8 reads every checkpoint file through
``TorchCheckpointEngine.load`` = ``torch.load(path, weights_only=False)``, i.e. it runs any
pickle in the storage path (pitfall 17). :func:`safe_torch_load` switches that to
``weights_only=True`` with an explicit allow-list of the three DeepSpeed classes its ZeRO-2/3
optimizer files contain, so a planted pickle is refused before any of its code runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catdpo_ray.train.sinks import atomic_write_bytes

MANIFEST_PREFIX = "catdpo_manifest.rank"
MANIFEST_FORMAT = 1
#: Streaming chunk: large enough that hashlib releases the GIL and threads hash in parallel.
CHUNK_BYTES = 8 << 20
#: Files Ray itself may add to a checkpoint directory (``Checkpoint.set_metadata``); never loaded by us.
IGNORED_FILES = frozenset({".metadata.json"})
#: Globals (besides torch's defaults) that DeepSpeed 0.19.8 ZeRO-2/3 optimizer files pickle,
#: found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on the tiny model's files.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs a pickle global that is not on the allow-list: refused, not run."""


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify_checkpoint`: ``ok``, else ``reason`` names the file and the fault."""

    ok: bool
    reason: str = ""
    step: int | None = None
    files: int = 0
    bytes: int = 0


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def _is_manifest(rel: str) -> bool:
    return rel.startswith(MANIFEST_PREFIX) and rel.endswith(".json") and "/" not in rel


def file_digest(path: Path, *, fsync: bool = False) -> str:
    """sha256 of ``path`` streamed in 8 MiB chunks; ``fsync`` also flushes it to disk (Linux
    allows fsync on a read-only descriptor), so a manifest never outlives the data it lists."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def _parallel(fn: Callable[[str], Any], items: Sequence[str], threads: int | None) -> list[Any]:
    workers = threads or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _walk(root: Path) -> list[str]:
    """Every regular file under ``root`` as a POSIX relative path, sorted (deterministic manifests)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def write_manifest(ckpt_dir: str | Path, *, run_id: str, step: int, extra: dict[str, Any] | None = None,
                   rank: int = 0, world_size: int = 1, files: Iterable[str] | None = None,
                   threads: int | None = None) -> Path:
    """Write ``catdpo_manifest.rank<rank>.json`` as this rank's LAST file of the checkpoint.

    Args:
        ckpt_dir: the directory this rank saved into (its own staging dir under Ray Train).
        run_id: ties the checkpoint to its run; :func:`verify_checkpoint` refuses any other.
        step: the optimizer step the checkpoint holds.
        extra: small JSON-able facts to keep beside (e.g. the DeepSpeed tag).
        rank / world_size: this rank and how many manifests a complete checkpoint has.
        files: relative paths this rank wrote; default every file under ``ckpt_dir`` except
            manifests. Pass it when several ranks save into ONE shared directory.
        threads: hashing threads (default min(8, cpus)).

    Returns:
        The manifest path.
    """
    root = Path(ckpt_dir)
    rels = sorted(files) if files is not None else [r for r in _walk(root) if not _is_manifest(r)]

    def entry(rel: str) -> dict[str, Any]:
        p = root / rel
        return {"size": p.stat().st_size, "sha256": file_digest(p, fsync=True)}

    listed = dict(zip(rels, _parallel(entry, rels, threads)))
    manifest = {"format": MANIFEST_FORMAT, "run_id": run_id, "step": int(step), "rank": rank,
                "world_size": world_size, "hash": "sha256", "files": listed, "extra": extra or {}}
    path = root / manifest_name(rank)
    atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return path


def _read_manifests(root: Path) -> tuple[list[dict[str, Any]], str]:
    found = sorted(p for p in root.glob(f"{MANIFEST_PREFIX}*.json") if p.is_file())
    out = []
    for p in found:
        try:
            m = json.loads(p.read_text())
            if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
                raise ValueError("no 'files' object")
        except (OSError, ValueError) as exc:
            return [], f"{p}: manifest unreadable ({exc})"
        m["_path"] = p
        out.append(m)
    return out, ""


def verify_checkpoint(ckpt_dir: str | Path, *, run_id: str, ranks: Iterable[int] | None = None,
                      threads: int | None = None) -> VerifyResult:
    """Check a checkpoint against its manifests before loading any of it.

    Args:
        ckpt_dir: the checkpoint directory (Ray's merged one, or a local-mode one).
        run_id: this run's id; a checkpoint of any other run is refused.
        ranks: hash only the files these ranks' manifests list (each rank checks its own shard
            in parallel, then the caller all-reduces ``ok``); presence of all manifests, sizes
            and unlisted files are checked in full either way. Default: every rank's files.
        threads: hashing threads.

    Returns:
        :class:`VerifyResult`; on failure ``reason`` names the file and what is wrong.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return VerifyResult(False, f"{root}: checkpoint directory missing")
    manifests, err = _read_manifests(root)
    if err:
        return VerifyResult(False, err)
    if not manifests:
        return VerifyResult(False, f"{root}: manifest missing ({MANIFEST_PREFIX}<k>.json): not a complete catdpo checkpoint")
    first = manifests[0]
    if first.get("run_id") != run_id:
        return VerifyResult(False, f"{root}: not this run's checkpoint (it belongs to run {first.get('run_id')!r}, "
                                   f"this run is {run_id!r}); refusing to load it")
    for m in manifests:
        for key in ("run_id", "step", "world_size"):
            if m.get(key) != first.get(key):
                return VerifyResult(False, f"{m['_path']}: {key} {m.get(key)!r} differs from "
                                           f"{first['_path'].name}'s {first.get(key)!r}")
    world = int(first["world_size"])
    missing = sorted(set(range(world)) - {int(m["rank"]) for m in manifests})
    if missing:
        names = ", ".join(manifest_name(r) for r in missing)
        return VerifyResult(False, f"{root}: manifest missing for rank(s) {missing} of world size {world} ({names}): "
                                   "that rank's save did not finish")
    listed: dict[str, dict[str, Any]] = {}
    owner: dict[str, int] = {}
    for m in manifests:
        for rel, meta in m["files"].items():
            listed[rel] = meta
            owner[rel] = int(m["rank"])
    unlisted = [r for r in _walk(root) if not _is_manifest(r) and r not in listed and r not in IGNORED_FILES]
    if unlisted:
        return VerifyResult(False, f"{root / unlisted[0]}: file not in any manifest ({len(unlisted)} unlisted); "
                                   "the checkpoint was changed after it was saved")
    total = 0
    for rel, meta in sorted(listed.items()):
        p = root / rel
        if not p.is_file():
            return VerifyResult(False, f"{p}: file missing (listed in {manifest_name(owner[rel])})")
        size = p.stat().st_size
        if size != meta["size"]:
            return VerifyResult(False, f"{p}: size mismatch ({size} bytes, manifest says {meta['size']}): truncated or replaced")
        total += size
    wanted = set(range(world)) if ranks is None else set(ranks)
    to_hash = sorted(r for r in listed if owner[r] in wanted)
    digests = _parallel(lambda rel: file_digest(root / rel), to_hash, threads)
    for rel, digest in zip(to_hash, digests):
        if digest != listed[rel]["sha256"]:
            return VerifyResult(False, f"{root / rel}: hash mismatch (sha256 {digest[:12]}…, manifest says "
                                       f"{listed[rel]['sha256'][:12]}…): the bytes changed after saving")
    return VerifyResult(True, "", step=int(first["step"]), files=len(listed), bytes=total)


def choose_checkpoint(candidates: Iterable[str | Path], run_id: str, *,
                      threads: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest good checkpoint of ``candidates`` (given newest first), and the rejected ones.

    Returns:
        ``(directory or None, [(rejected directory, reason), ...])``: the caller says which were
        skipped ("checkpoint at step 8 rejected: ...; falling back to step 4").
    """
    rejected: list[tuple[Path, str]] = []
    for cand in candidates:
        res = verify_checkpoint(cand, run_id=run_id, threads=threads)
        if res.ok:
            return Path(cand), rejected
        rejected.append((Path(cand), res.reason))
    return None, rejected


def _resolve(qualname: str) -> Any:
    import importlib

    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


@contextmanager
def safe_torch_load(extra_globals: Sequence[Any] = ()) -> Iterator[None]:
    """Make DeepSpeed's checkpoint loads ``weights_only=True`` with an explicit allow-list.

    Wrap ``engine.load_checkpoint(...)`` in it. Inside, ``TorchCheckpointEngine.load`` (the one
    place DeepSpeed 0.19.8 reads checkpoint files, with ``weights_only=False``) is replaced by a
    ``weights_only=True`` load; torch's restricted unpickler builds only tensors, containers and
    the allow-listed classes, and never calls an arbitrary callable. A file that needs anything
    else raises :class:`UnsafeCheckpointError` naming the file and the global.

    Args:
        extra_globals: further classes to allow (e.g. when a DeepSpeed upgrade pickles a new one).
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = [_resolve(q) for q in DEEPSPEED_SAFE_GLOBALS] + list(extra_globals)
    original = TorchCheckpointEngine.__dict__["load"]

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = f"it needs {found.group(1)}, which is not on the allow-list" if found else str(exc).splitlines()[0]
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle (weights_only=True): {what}. "
                "Only checkpoints written by this run are loaded; if this file is trusted and a newer "
                "DeepSpeed needs another class, pass it in safe_torch_load(extra_globals=...)") from exc

    TorchCheckpointEngine.load = load  # type: ignore[method-assign]
    try:
        # Also covers DeepSpeed's other checkpoint engines, which call torch.load with the
        # default weights_only (True since torch 2.6).
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        TorchCheckpointEngine.load = original  # type: ignore[method-assign]
