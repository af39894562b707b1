"""RMSNorm module over stepvox.kernels.rms_norm (optionally fusing the residual add)."""
from __future__ import annotations

import torch
from torch import nn

from stepvox.kernels import KernelConfig, rms_norm

from ..distributed.parallel_state import TPGroup


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, device: torch.device, kernels: KernelConfig):
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)

    def load_shard(self, source, shard: int = 0) -> None:
        self.weight.data.copy_(source[:])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual, backend=self.kernels.backend, pdl=self.kernels.pdl)

    def reduce_add(self, partial: torch.Tensor, residual: torch.Tensor, tp: TPGroup):
        """(norm(residual), residual) with residual += the sum over the ranks of `partial`, in one
        kernel (the custom all-reduce's fused variant): what forward(all_reduce(partial), residual) gives."""
        return tp.all_reduce_add_rms_norm(partial, residual, self.weight, self.eps), residual
