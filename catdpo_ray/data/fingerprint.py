"""The reference log-prob cache: fingerprints of everything the numbers depend on, and entries.

A cache entry is valid for exactly one combination of

* the reference weights: sha256 of every weight file (``*.safetensors``, ``*.bin``) and of
  ``config.json`` of a local directory; for a hub id the repository and its *resolved* commit
  (a branch name such as ``main`` moves, a commit does not);
* the tokenizer files (they fix the pad and start tokens as well as the ids);
* the tokenized pairs: one content key per pair (:func:`row_key`), hashed as a sorted multiset so
  a reshuffled split (another ``train.seed``) reuses the entry -- rows are joined back by key,
  never by position, so order cannot misalign them;
* the maximum lengths, the prompt template / chat-template flag, dtype, attention
  implementation, whether B-DPO's response-only terms are included, the torch and transformers
  versions (modeling code changes can change logits), and :data:`FORMAT_VERSION`.

Device (CPU vs GPU) and the scoring micro-batch are deliberately left out: they change the
numbers only within float tolerance (right padding never reaches a real token under a causal mask).
An entry is ``<cache>/<fingerprint>/``: one ``.npy`` per column (``row_key`` ``S32`` sorted, then
float32 log-probs) and ``manifest.json`` (rows, columns, size and sha256 of every file, the
fingerprint inputs). It is written in a temporary directory, manifest last, then renamed into
place: readers see a complete entry or none. :func:`read_entry` re-checks everything and returns a
reason instead of data for a missing, partial or corrupt entry; files load with
``allow_pickle=False``, so a cache directory can never execute code.

Standard library and numpy only; ``huggingface_hub`` is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when the cache layout or the meaning of a stored column changes.
FORMAT_VERSION = 1
#: Files whose bytes are the reference weights (plus ``config.json``).
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.bin", "config.json")
#: Files that define a tokenizer (HF fast/slow, sentencepiece, chat template).
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json",
)
#: The tokenized columns a pair's reference log-probs are a function of.
KEY_COLUMNS: tuple[str, ...] = ("chosen_ids", "chosen_start", "rejected_ids", "rejected_start")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class UncacheableError(RuntimeError):
    """The reference weights cannot be identified, so their log-probs must not be cached."""


def row_key(chosen_ids: Sequence[int] | np.ndarray, chosen_start: int, rejected_ids: Sequence[int] | np.ndarray,
            rejected_start: int) -> bytes:
    """128-bit content key of one tokenized pair (32 hex digits, ASCII bytes).

    Lengths and starts are hashed before the ids, so no two different pairs share a byte stream.
    """
    c = np.asarray(chosen_ids, dtype="<i8")
    r = np.asarray(rejected_ids, dtype="<i8")
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray([c.size, int(chosen_start), r.size, int(rejected_start)], dtype="<i8").tobytes())
    h.update(c.tobytes())
    h.update(r.tobytes())
    return h.hexdigest().encode("ascii")


def batch_row_keys(batch: dict[str, Any]) -> np.ndarray:
    """Row keys of a numpy batch (ragged object arrays or fixed-shape 2-D arrays): ``[B]`` ``S32``."""
    missing = [c for c in KEY_COLUMNS if c not in batch]
    if missing:
        raise KeyError(f"tokenized batch lacks column(s) {missing}; has {sorted(batch)}")
    keys = [row_key(c, cs, r, rs) for c, cs, r, rs in zip(*(batch[name] for name in KEY_COLUMNS))]
    return np.asarray(keys, dtype="S32")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(directory: Path, patterns: Iterable[str], *, memo: Path | None = None) -> dict[str, str]:
    """``{file name: sha256}`` of the files of ``directory`` matching ``patterns``.

    ``memo`` (a JSON file) remembers digests by (path, inode, size, mtime, ctime): hashing 26 GB of
    13B weights takes about a minute, and every run and trial would otherwise pay it again.
    """
    known: dict[str, Any] = {}
    if memo is not None and memo.exists():
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}  # a damaged memo only costs a re-hash
    out: dict[str, str] = {}
    changed = False
    for path in sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()}):
        st = path.stat()
        stamp = f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        digest = known.get(stamp)
        if digest is None:
            digest, changed = sha256_file(path), True
            known[stamp] = digest
        out[path.name] = digest
    if memo is not None and changed:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, sort_keys=True))
        tmp.replace(memo)  # atomic: a concurrent reader sees the old or the new memo, never half of one
    return out


def resolve_hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit a hub id (at ``revision``, default ``main``) resolves to, or UncacheableError."""
    if revision is not None and _COMMIT.match(revision):
        return revision  # already immutable: no network needed
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(repo_id, revision=revision).sha
    except Exception as err:  # offline, unknown repo, gated: we cannot know which weights these are
        raise UncacheableError(
            f"cannot resolve the hub model {repo_id!r} (revision {revision or 'main'!r}) to a commit ({err}); "
            "reference log-probs will not be cached. Set model.revision to a 40-hex commit, or use a local "
            "directory") from err
    if not sha:
        raise UncacheableError(f"the hub returned no commit for {repo_id!r}; reference log-probs will not be cached")
    return str(sha)


def source_identity(path: str, patterns: Sequence[str], *, revision: str | None, what: str,
                    memo: Path | None = None) -> dict[str, Any]:
    """Identity of a model or tokenizer: file digests of a local directory, or hub repo + commit."""
    local = Path(path).expanduser()
    if local.is_dir():
        files = hash_files(local, patterns, memo=memo)
        if not files:
            raise UncacheableError(f"{what} directory {local} has no file matching {list(patterns)}")
        return {"files": files}
    return {"hub": path, "commit": resolve_hub_revision(path, revision)}


def pairs_digest(keys: np.ndarray) -> str:
    """sha256 of the sorted multiset of row keys (order-free: rows are joined back by key)."""
    return hashlib.sha256(np.sort(np.asarray(keys, dtype="S32")).tobytes()).hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``inputs`` (first 32 hex digits: the cache entry's name)."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


MANIFEST = "manifest.json"


def write_entry(root: Path, key: str, columns: dict[str, np.ndarray], inputs: dict[str, Any]) -> Path:
    """Write ``columns`` (all ``[N]``, ``row_key`` among them) as entry ``root/key``; returns its path.

    Atomic: files go to ``root/.tmp-<key>-<random>``, the manifest last, then one rename. A stale
    (corrupt) entry under the same key is moved aside first; if another process wins the race with
    a complete entry, ours is discarded (both hold the same numbers).
    """
    rows = {len(v) for v in columns.values()}
    if len(rows) != 1 or "row_key" not in columns:
        raise ValueError(f"cache columns must include row_key and share one length; got "
                         f"{ {k: len(v) for k, v in columns.items()} }")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files: dict[str, Any] = {}
        for name, arr in columns.items():
            path = tmp / f"{name}.npy"
            np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
            files[name] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                           "dtype": str(arr.dtype)}
        manifest = {"format_version": FORMAT_VERSION, "fingerprint": key, "rows": rows.pop(), "columns": files,
                    "inputs": inputs}
        with (tmp / MANIFEST).open("w") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        entry = root / key
        if entry.exists():
            if read_entry(root, key, expected_rows=manifest["rows"])[0] is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer finished first
                return entry
            stale = root / f".stale-{key}-{secrets.token_hex(4)}"
            entry.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(entry)
        return entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_entry(root: Path, key: str, *, expected_rows: int) -> tuple[dict[str, np.ndarray] | None, str]:
    """``(columns, "hit")`` for a complete, intact entry, else ``(None, reason)``; never raises on bad data."""
    entry = root / key
    if not entry.is_dir():
        return None, "no entry"
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"partial entry {entry}: no {MANIFEST}"
    except (OSError, ValueError) as err:
        return None, f"corrupt entry {entry}: unreadable {MANIFEST} ({err})"
    try:
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("fingerprint") != key:
            return None, f"entry {entry}: format/fingerprint mismatch"
        if manifest["rows"] != expected_rows:
            return None, f"entry {entry}: {manifest['rows']} rows, the split has {expected_rows}"
        out: dict[str, np.ndarray] = {}
        for name, meta in manifest["columns"].items():
            path = entry / meta["file"]
            if not path.is_file():
                return None, f"corrupt entry {entry}: {meta['file']} missing"
            if path.stat().st_size != meta["bytes"]:
                return None, f"corrupt entry {entry}: {meta['file']} has {path.stat().st_size} bytes, manifest says {meta['bytes']}"
            if sha256_file(path) != meta["sha256"]:
                return None, f"corrupt entry {entry}: {meta['file']} sha256 mismatch"
            arr = np.load(path, allow_pickle=False)
            if arr.shape != (expected_rows,) or str(arr.dtype) != meta["dtype"]:
                return None, f"corrupt entry {entry}: {meta['file']} shape {arr.shape} dtype {arr.dtype}"
            out[name] = arr
    except (KeyError, TypeError, ValueError) as err:
        return None, f"corrupt entry {entry}: {type(err).__name__}: {err}"
    if "row_key" not in out:
        return None, f"corrupt entry {entry}: no row_key column"
    return out, "hit"


__all__ = [
    "MANIFEST",
    "FORMAT_VERSION",
    "KEY_COLUMNS",
    "TOKENIZER_PATTERNS",
    "WEIGHT_PATTERNS",
    "UncacheableError",
    "batch_row_keys",
    "fingerprint",
    "hash_files",
    "pairs_digest",
    "read_entry",
    "resolve_hub_revision",
    "row_key",
    "sha256_file",
    "source_identity",
    "write_entry",
]
