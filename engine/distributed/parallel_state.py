"""The tensor-parallel group a process belongs to, and the collectives the layers call.

Layers never talk to torch.distributed directly: they call `tp_all_reduce` / `tp_gather_logits`,
so a faster all-reduce (a CUDA kernel, later) can replace NCCL's in one place.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None      # a torch.distributed ProcessGroup when size > 1


_GROUP = TPGroup()


def set_tp_group(group: TPGroup) -> None:
    global _GROUP
    _GROUP = group


def get_tp_group() -> TPGroup:
    return _GROUP


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the tensor-parallel ranks, in place."""
    g = _GROUP
    if g.size > 1:
        dist.all_reduce(x, group=g.group)
    return x


def tp_gather_logits(local: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's vocabulary slice of the logits along the last dim (all ranks get them)."""
    g = _GROUP
    if g.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(g.size)]
    dist.all_gather(parts, local.contiguous(), group=g.group)
    return torch.cat(parts, dim=-1)


def tp_min_int(value: int, device: torch.device) -> int:
    """The smallest of an integer over the ranks (e.g. KV pages each rank has room for)."""
    g = _GROUP
    if g.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g.group)
    return int(t.item())
