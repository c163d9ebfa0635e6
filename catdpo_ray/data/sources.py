"""Sources of raw rows: local JSONL / JSON / Parquet files (optionally gzip-compressed), the
bundled sample, HF hub datasets.

Each reader yields ``(row_number, raw)`` where ``row_number`` is 1-based (the line number for
JSONL, the element index for a JSON array) and ``raw`` is a dict, or an :class:`UnparsableRow`
for a line that is not a JSON object (or not UTF-8). No network is touched unless the config
names a hub dataset.

What a file may look like, and what happens otherwise:

- ``.jsonl`` / ``.json`` / ``.parquet``, and ``.jsonl.gz`` / ``.json.gz`` read through gzip.
- A gzip stream named ``.jsonl`` / ``.json`` is recognised by its magic bytes and read the same
  way; any other binary container (zip, zstd, bzip2, xz, Parquet) named as JSON text is refused
  with a :class:`DataFileError` naming the file and what it is.
- A UTF-8 byte-order mark at the start of a JSON/JSONL file is skipped (editors on Windows write
  one); a UTF-16 file is refused with a message saying so.
- Every decoding or parsing problem names the file, and the line where there is one.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"

_UTF8_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
#: Leading bytes of containers that are not JSON text: (magic, what it is). Checked in order.
_FOREIGN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file"),
    *((b"BZh%d" % level, "a bzip2-compressed file") for level in range(1, 10)),
    (b"\xfd7zXZ\x00", "an xz-compressed file"),
    (b"PAR1", "a Parquet file (name it .parquet)"),
    (b"\xff\xfe", "UTF-16 text (byte-order mark FF FE); save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text (byte-order mark FE FF); save it as UTF-8"),
)


class DataFileError(ValueError):
    """A data file that cannot be read at all: the message names the file (and line if any)."""


@dataclass(frozen=True)
class UnparsableRow:
    """A source line that could not be parsed into an object."""

    text: str
    reason: str


RawRow = dict[str, Any] | UnparsableRow
Reader = Callable[[Path, bool], Iterator[tuple[int, RawRow]]]


def bundled_path(split: str) -> Path:
    """Path of the bundled sample corpus split (``train`` or ``test``)."""
    path = SAMPLE_DIR / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"bundled corpus split {split!r} not found at {path}")
    return path


def _open_binary(path: Path, gzipped: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def _gzip_error(path: Path, where: str, exc: Exception) -> DataFileError:
    # gzip raises BadGzipFile / EOFError / zlib.error with no file name: add it, and where it broke.
    return DataFileError(f"{path}: damaged gzip stream ({type(exc).__name__}: {exc}) {where}")


def read_jsonl(path: Path, gzipped: bool = False) -> Iterator[tuple[int, RawRow]]:
    """One JSON object per line. Lines are decoded one at a time, so a bad byte names its line."""
    lineno = 0
    try:
        with _open_binary(path, gzipped) as fh:
            for lineno, raw_line in enumerate(fh, start=1):
                if lineno == 1 and raw_line.startswith(_UTF8_BOM):
                    raw_line = raw_line[len(_UTF8_BOM):]
                if not raw_line.strip():
                    continue
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    text = raw_line[:500].decode("utf-8", errors="replace")
                    yield lineno, UnparsableRow(text, f"not valid UTF-8: {exc.reason} at byte {exc.start} of the line")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, UnparsableRow(line[:500], f"unparsable JSON: {exc.msg} at column {exc.colno}")
                    continue
                if not isinstance(obj, dict):
                    yield lineno, UnparsableRow(line[:500], f"expected a JSON object, got {type(obj).__name__}")
                    continue
                yield lineno, obj
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _gzip_error(path, f"after line {lineno}", exc) from None


def read_json_array(path: Path, gzipped: bool = False) -> Iterator[tuple[int, RawRow]]:
    """A JSON array of row objects (the whole file is parsed at once)."""
    try:
        with _open_binary(path, gzipped) as fh:
            data = fh.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _gzip_error(path, "while reading", exc) from None
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFileError(f"{path}, line {line}: not valid UTF-8 ({exc.reason})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one object per line is JSON Lines: name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise DataFileError(f"{path}, line {exc.lineno}: not valid JSON: {exc.msg} at column {exc.colno}{hint}") from None
    if not isinstance(rows, list):
        raise DataFileError(f"{path}: a .json data file must hold a list of row objects, got {type(rows).__name__}")
    for i, obj in enumerate(rows, start=1):
        yield i, obj if isinstance(obj, dict) else UnparsableRow(repr(obj)[:500], "expected an object")


def read_parquet(path: Path, gzipped: bool = False) -> Iterator[tuple[int, RawRow]]:
    """Rows of a Parquet file (its own compression is internal; ``gzipped`` is never set)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataFileError(f"{path}: not a readable Parquet file: {exc}") from None
    yield from enumerate(table.to_pylist(), start=1)


READERS: dict[str, Reader] = {".jsonl": read_jsonl, ".json": read_json_array, ".parquet": read_parquet}
#: Formats that may also come gzip-compressed (``<name>.jsonl.gz``).
GZIP_OK: frozenset[str] = frozenset({".jsonl", ".json"})
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(sorted([*READERS, *(s + ".gz" for s in GZIP_OK)]))


def file_format(path: Path) -> tuple[str, bool]:
    """(base suffix such as ``.jsonl``, named as gzip) from the file name alone."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz" and suffixes[-2] in GZIP_OK:
        return suffixes[-2], True
    return (suffixes[-1] if suffixes else ""), False


def read_file(path: str | Path) -> Iterator[tuple[int, RawRow]]:
    """Rows of a local data file, dispatched on its name and checked against its first bytes.

    Raises:
        FileNotFoundError: no such file.
        DataFileError: an unsupported name, or contents that do not match it (see the module doc).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.is_dir():
        raise DataFileError(f"{p}: is a directory; data.train/data.test name one file")
    base, named_gzip = file_format(p)
    if base not in READERS:
        shown = "".join(p.suffixes[-2:]) if p.suffix.lower() == ".gz" else p.suffix
        raise DataFileError(f"{p}: unsupported data file type {shown!r}; use one of {list(SUPPORTED_SUFFIXES)}")
    with p.open("rb") as fh:
        head = fh.read(8)
    is_gzip = head.startswith(_GZIP_MAGIC)
    if named_gzip and not is_gzip:
        raise DataFileError(f"{p}: named .gz but not gzip-compressed; rename it to {p.name[:-3]!r}")
    if base in GZIP_OK and not is_gzip:
        for magic, what in _FOREIGN_MAGIC:
            if head.startswith(magic):
                raise DataFileError(f"{p}: this is {what}, not {base} text")
    if base == ".parquet" and is_gzip:
        raise DataFileError(f"{p}: a gzip stream named .parquet; decompress it first")
    # A gzip stream named .jsonl/.json is read through gzip: the bytes say what it is.
    return READERS[base](p, is_gzip)


def read_hub(name: str, *, config: str | None, split: str, revision: str | None) -> Iterator[tuple[int, RawRow]]:
    """Rows of a HF hub dataset through ``datasets.load_dataset`` (needs hub access)."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split, revision=revision)
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def read_any_dataset(ds: Any) -> Iterator[tuple[int, RawRow]]:
    """Rows of an in-memory ``datasets.Dataset`` (or any iterable of dicts)."""
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)
