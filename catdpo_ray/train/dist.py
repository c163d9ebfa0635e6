"""Thin collective helpers that also work in Ray Train local mode (no process group = no-op).

Every helper here is a collective when a process group exists: every rank must call it the
same number of times (ARCHITECTURE.md "Contracts"). Tensors are moved to ``device`` first
because NCCL only accepts device tensors (RAY_DEEPSPEED_NOTES.md pitfall 7).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce(t: torch.Tensor, device: torch.device, op: str = "sum") -> torch.Tensor:
    """All-reduce ``t`` (SUM, MIN or MAX) and return it on the CPU."""
    if not is_distributed():
        return t.detach().cpu().clone()
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    buf = t.detach().to(device).clone()
    dist.all_reduce(buf, op=ops[op])
    return buf.cpu()


def broadcast(t: torch.Tensor, device: torch.device, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (returned on the CPU)."""
    if not is_distributed():
        return t.detach().cpu().clone()
    buf = t.detach().to(device).clone()
    dist.broadcast(buf, src=src)
    return buf.cpu()


def all_gather(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stack of every rank's ``t``: ``[world_size, *t.shape]`` on the CPU."""
    if not is_distributed():
        return t.detach().cpu().clone().unsqueeze(0)
    buf = t.detach().to(device).contiguous()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    return torch.stack([o.cpu() for o in out])


def barrier() -> None:
    if is_distributed():
        dist.barrier()
