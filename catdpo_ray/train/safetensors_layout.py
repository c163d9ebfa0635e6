"""The layout of an exported checkpoint's safetensors files, planned before any gather: HF-style
greedy sharding by ``max_shard_size``, each file's header and byte offsets, and a writer that puts
each tensor at its planned offset (used by :mod:`catdpo_ray.train.export`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

SINGLE_FILE = "model.safetensors"

#: safetensors dtype tags (the format's spec); anything else is refused by name.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5e9 bytes (decimal units as HF's ``max_shard_size``; ``GiB`` etc. binary)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
        if m is None or m.group(2) not in _UNITS:
            raise ValueError(f"max_shard_size: cannot parse {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class OutSpec:
    """One tensor of the exported checkpoint, known before any gather.

    ``source`` is the module's parameter/buffer name whose (gathered) value is written; for a LoRA
    layer ``lora`` is ``(lora_A name, lora_B name, scaling)`` and the merged weight is written.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str
    lora: tuple[str, str, float] | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Shard:
    """One safetensors file: its tensors (layout order), their byte offsets, the encoded header."""

    file: str
    specs: list[OutSpec]
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    header: bytes = b""

    @property
    def data_bytes(self) -> int:
        return max((end for _, end in self.offsets.values()), default=0)


def plan_shards(specs: list[OutSpec], max_shard_bytes: int) -> list[Shard]:
    """Greedy HF sharding of ``specs`` in walk order, then each shard's safetensors layout+header."""
    groups: list[list[OutSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    n = len(groups)
    shards = []
    for i, members in enumerate(groups):
        name = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shard = Shard(name, members)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in sorted(members, key=lambda s: (-torch.empty((), dtype=s.dtype).element_size(), s.name)):
            shard.offsets[spec.name] = (offset, offset + spec.nbytes)
            header[spec.name] = {"dtype": _ST_DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        shard.header = raw + b" " * (-len(raw) % 8)
        shards.append(shard)
    return shards


class ShardWriter:
    """Writes tensors at their planned offsets; shards are filled in walk order, one file open."""

    def __init__(self, directory: Path, shards: list[Shard]) -> None:
        self.directory = directory
        self.shards = shards
        self.where = {spec.name: i for i, s in enumerate(shards) for spec in s.specs}
        self.current = -1
        self.fh: IO[bytes] | None = None
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        idx = self.where[name]
        if idx != self.current:
            self._close()
            self.current = idx
            self.fh = (self.directory / self.shards[idx].file).open("wb")
            self.fh.write(len(self.shards[idx].header).to_bytes(8, "little") + self.shards[idx].header)
        shard = self.shards[idx]
        start, end = shard.offsets[name]
        cpu = tensor.detach().to("cpu").contiguous()  # one tensor's copy on rank 0 (none on CPU)
        if end - start != cpu.numel() * cpu.element_size():
            raise RuntimeError(f"export: {name} has {tuple(cpu.shape)} {cpu.dtype}, planned {end - start} bytes")
        if end > start:
            assert self.fh is not None
            self.fh.seek(8 + len(shard.header) + start)
            self.fh.write(memoryview(cpu.reshape(-1).view(torch.uint8).numpy()))
        self.written += end - start

    def _close(self) -> None:
        if self.fh is None:
            return
        self.fh.close()
        self.fh = None
        shard = self.shards[self.current]
        if self.written != shard.data_bytes:
            raise RuntimeError(f"export: {shard.file} got {self.written} of {shard.data_bytes} bytes")
        self.written = 0

    def finish(self) -> None:
        self._close()
        if self.current != len(self.shards) - 1:
            raise RuntimeError(f"export: wrote {self.current + 1} of {len(self.shards)} shards")
