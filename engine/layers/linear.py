"""Linear layers split over tensor-parallel ranks (no biases: Step1 has none).

Column-parallel layers own a slice of the output rows, row-parallel layers a slice of the input
columns and sum their partial products with an all-reduce. Fused layers (q|k|v, gate|up) hold
several checkpoint tensors stacked along the output dim; each is sliced per rank on its own.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stepvox.kernels import KernelConfig, linear_small_m

from ..distributed.parallel_state import TPGroup
from ..errors import ConfigError


class Matmul:
    """x W^T: decode-sized batches (at most `gemv_max_rows` rows) on the GPU take the streaming GEMV
    kernel, the rest cuBLAS. `gemv_tiles(N, K)` may give a product's GEMV tile config (None: the
    kernel's own choice)."""

    def __init__(self, kernels: KernelConfig, gemv_max_rows: int = 16,
                 gemv_tiles: Callable[[int, int], dict | None] | None = None):
        self.kernels = kernels
        self.gemv_max_rows = gemv_max_rows
        self.gemv_tiles = gemv_tiles

    def tiles(self, weight: torch.Tensor) -> dict | None:
        return self.gemv_tiles(*weight.shape) if self.gemv_tiles is not None else None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.shape[0] <= self.gemv_max_rows:
            return linear_small_m(x, weight, config=self.tiles(weight), backend=self.kernels.backend,
                                  pdl=self.kernels.pdl)
        return F.linear(x, weight)


def _split(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ConfigError(f"{what} ({size}) cannot be split evenly over {parts} tensor-parallel ranks")
    return size // parts


class ColumnParallelLinear(nn.Module):
    """y = x W^T for W stacked from `out_sizes` checkpoint tensors, each split by output rows."""

    def __init__(self, in_features: int, out_sizes: list[int], dtype: torch.dtype, device: torch.device,
                 tp: TPGroup, matmul: Matmul, names: tuple[str, ...] = ()):
        super().__init__()
        self.rank, self.tp_size = tp.rank, tp.size
        self.matmul = matmul
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
        return self.matmul(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, W split by input columns; x arrives already split."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup, matmul: Matmul, name: str = "linear"):
        super().__init__()
        self.tp = tp
        self.rank, self.tp_size = tp.rank, tp.size
        self.matmul = matmul
        self.local_in = _split(in_features, tp.size, f"input size of {name}")
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype, device=device),
                                   requires_grad=False)

    def load_shard(self, source, shard: int = 0) -> None:
        start = self.rank * self.local_in
        self.weight.data.copy_(source[:, start:start + self.local_in])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.matmul(x, self.weight))
