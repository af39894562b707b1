"""Tensor-parallel process groups and the collectives the layers call.

A TPGroup is an object handed to the model at construction, not process-wide state: layers never
talk to torch.distributed directly but call `tp.all_reduce` / `tp.gather_logits`, so a faster
all-reduce (a CUDA kernel, later) can replace NCCL's in one place, and a one-rank model carries
`TPGroup()` and no group at all.
"""
from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

CONTROL_TIMEOUT = datetime.timedelta(seconds=600)


@dataclasses.dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None      # a torch.distributed ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the tensor-parallel ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's vocabulary slice of the logits along the last dim (all ranks get them)."""
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest of an integer over the ranks (e.g. KV pages each rank has room for)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def init_groups(rank: int, size: int, init_method: str, device: torch.device):
    """Join the ranks: returns (the model's TPGroup: NCCL on GPUs, gloo on CPUs, and a gloo group
    for step plans)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, world_size=size, rank=rank,
                            timeout=CONTROL_TIMEOUT, **kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return TPGroup(rank, size, dist.group.WORLD), control
