"""Linear layers split over tensor-parallel ranks (no biases: Step1 has none).

Column-parallel layers own a slice of the output rows, row-parallel layers a slice of the input
columns and sum their partial products with an all-reduce. Fused layers (q|k|v, gate|up) hold
several checkpoint tensors stacked along the output dim; each is sliced per rank on its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepvox.kernels import linear_small_m
from stepvox.kernels.gemv import MAX_M as GEMV_MAX_M

from ..distributed.parallel_state import get_tp_group, tp_all_reduce
from ..errors import ConfigError


MAX_M = GEMV_MAX_M     # rows up to which the GEMV kernel is used (a module variable: benchmarks switch it)


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T: decode-sized batches on the GPU take the streaming GEMV kernel, the rest cuBLAS."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_M:
        return linear_small_m(x, weight)
    return F.linear(x, weight)


def _split(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ConfigError(f"{what} ({size}) cannot be split evenly over {parts} tensor-parallel ranks")
    return size // parts


class ColumnParallelLinear(nn.Module):
    """y = x W^T for W stacked from `out_sizes` checkpoint tensors, each split by output rows."""

    def __init__(self, in_features: int, out_sizes: list[int], dtype: torch.dtype, device: torch.device,
                 names: tuple[str, ...] = ()):
        super().__init__()
        tp = get_tp_group()
        self.rank, self.tp_size = tp.rank, tp.size
        self.full_sizes = list(out_sizes)
        self.local_sizes = [_split(s, tp.size, f"output size of {n or 'linear'}")
                            for s, n in zip(out_sizes, names or [""] * len(out_sizes))]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(out_sizes))]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features, dtype=dtype, device=device),
                                   requires_grad=False)

    def load_shard(self, source, shard: int = 0) -> None:
        """Copy this rank's rows of checkpoint tensor number `shard` (a safetensors slice)."""
        local = self.local_sizes[shard]
        start = self.rank * local
        rows = source[start:start + local]
        self.weight.data[self.offsets[shard]:self.offsets[shard] + local].copy_(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, W split by input columns; x arrives already split."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 name: str = "linear"):
        super().__init__()
        tp = get_tp_group()
        self.rank, self.tp_size = tp.rank, tp.size
        self.local_in = _split(in_features, tp.size, f"input size of {name}")
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype, device=device),
                                   requires_grad=False)

    def load_shard(self, source, shard: int = 0) -> None:
        start = self.rank * self.local_in
        self.weight.data.copy_(source[:, start:start + self.local_in])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_all_reduce(matmul(x, self.weight))
