"""Linear layers split over tensor-parallel ranks (no biases: Step1 has none).

Column-parallel layers own a slice of the output rows, row-parallel layers a slice of the input
columns and sum their partial products with an all-reduce. Fused layers (q|k|v, gate|up) hold
several checkpoint tensors stacked along the output dim; each is sliced per rank on its own.

With `fp8=True` a layer keeps its weight as float8_e4m3fn with one float32 scale per output row
(fp8.py). A bf16 checkpoint tensor is quantized as it is copied in, one tensor at a time on the
layer's device; a row's scale always covers the whole row, so a rank's slice of weight and scales
equals the same slice of the whole tensor quantized (a row-parallel rank reads whole rows, in
blocks, to find it). An FP8 checkpoint tensor comes with its scales and is copied as stored.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stepvox.kernels import KernelConfig, linear_fp8, linear_small_m, use_triton

from ..distributed.parallel_state import TPGroup
from ..errors import CheckpointError, ConfigError
from stepvox.kernels.fp8 import FP8_DTYPE, dequantize_rows, quantize_rows

ROW_BLOCK_BYTES = 256 << 20        # host memory a row-parallel FP8 load reads at a time


class Matmul:
    """x W^T: decode-sized batches (at most `gemv_max_rows` rows) on the GPU take the streaming GEMV
    kernel; larger products take cuBLAS, or the FP8 GEMM (kernels/gemm_fp8.py) for an FP8 weight.
    `gemv_tiles(N, K)` may give a product's GEMV tile config (None: the kernel's own choice)."""

    def __init__(self, kernels: KernelConfig, gemv_max_rows: int = 16,
                 gemv_tiles: Callable[[int, int], dict | None] | None = None):
        self.kernels = kernels
        self.gemv_max_rows = gemv_max_rows
        self.gemv_tiles = gemv_tiles

    def tiles(self, weight: torch.Tensor) -> dict | None:
        return self.gemv_tiles(*weight.shape) if self.gemv_tiles is not None else None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """`scale`: the row scales of an FP8 weight. The GEMV and the FP8 GEMM read FP8 weights
        themselves; only where neither runs (the reference backend) is the weight dequantized per call."""
        if x.is_cuda and x.dim() == 2 and x.shape[0] <= self.gemv_max_rows:
            return linear_small_m(x, weight, config=self.tiles(weight), scale=scale, backend=self.kernels.backend,
                                  pdl=self.kernels.pdl)
        if scale is not None:
            if use_triton(x, self.kernels.backend):
                # the kernel takes rows: leading dims (batch, tokens) are flattened and restored
                out = linear_fp8(x.reshape(-1, x.shape[-1]), weight, scale, backend=self.kernels.backend)
                return out.reshape(*x.shape[:-1], weight.shape[0])
            return F.linear(x, dequantize_rows(weight, scale, x.dtype))
        return F.linear(x, weight)


def weight_params(module: nn.Module, rows: int, cols: int, dtype, device, fp8: bool) -> None:
    module.weight = nn.Parameter(torch.empty(rows, cols, dtype=FP8_DTYPE if fp8 else dtype, device=device),
                                 requires_grad=False)
    module.weight_scale = (nn.Parameter(torch.ones(rows, dtype=torch.float32, device=device), requires_grad=False)
                           if fp8 else None)


def stored_fp8(source, scale, what: str) -> bool:
    """Whether a checkpoint tensor (a safetensors slice or a tensor) is stored in FP8, which it must
    then come with its scales."""
    fp8 = source.dtype == FP8_DTYPE if isinstance(source, torch.Tensor) else source.get_dtype() == "F8_E4M3"
    if fp8 and scale is None:
        raise CheckpointError(f"{what}: an FP8 tensor without its scales")
    if scale is not None and not fp8:
        raise CheckpointError(f"{what}: scales given for a tensor that is not FP8")
    return fp8


def copy_rows(weight: torch.Tensor, scale: torch.Tensor | None, rows, row_scales=None) -> None:
    """Copy checkpoint rows into a (slice of a) layer weight: as stored, or quantized on the way
    into an FP8 weight, or FP8 rows with their scales."""
    if scale is None:
        weight.copy_(rows)
    elif row_scales is not None:
        weight.copy_(rows)
        scale.copy_(row_scales)
    else:
        q, s = quantize_rows(rows.to(weight.device))
        weight.copy_(q)
        scale.copy_(s)


def _split(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ConfigError(f"{what} ({size}) cannot be split evenly over {parts} tensor-parallel ranks")
    return size // parts


class ColumnParallelLinear(nn.Module):
    """y = x W^T for W stacked from `out_sizes` checkpoint tensors, each split by output rows."""

    def __init__(self, in_features: int, out_sizes: list[int], dtype: torch.dtype, device: torch.device,
                 tp: TPGroup, matmul: Matmul, names: tuple[str, ...] = (), fp8: bool = False):
        super().__init__()
        self.rank, self.tp_size = tp.rank, tp.size
        self.matmul = matmul
        self.full_sizes = list(out_sizes)
        self.local_sizes = [_split(s, tp.size, f"output size of {n or 'linear'}")
                            for s, n in zip(out_sizes, names or [""] * len(out_sizes))]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(out_sizes))]
        weight_params(self, sum(self.local_sizes), in_features, dtype, device, fp8)

    def load_shard(self, source, shard: int = 0, scale=None) -> None:
        """Copy this rank's rows of checkpoint tensor number `shard` (a safetensors slice; `scale`:
        its scales' slice when the checkpoint stores it in FP8)."""
        local = self.local_sizes[shard]
        start, at = self.rank * local, self.offsets[shard]
        as_stored = stored_fp8(source, scale, "a linear weight")
        rows = source[start:start + local]
        own_scale = None if self.weight_scale is None else self.weight_scale.data[at:at + local]
        if as_stored and own_scale is None:
            raise CheckpointError("an FP8 checkpoint loads into an FP8 model only")
        copy_rows(self.weight.data[at:at + local], own_scale, rows, scale[start:start + local] if as_stored else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.weight_scale)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, W split by input columns; x arrives already split."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 tp: TPGroup, matmul: Matmul, name: str = "linear", fp8: bool = False):
        super().__init__()
        self.tp = tp
        self.rank, self.tp_size = tp.rank, tp.size
        self.matmul = matmul
        self.in_features = in_features
        self.local_in = _split(in_features, tp.size, f"input size of {name}")
        weight_params(self, out_features, self.local_in, dtype, device, fp8)

    def load_shard(self, source, shard: int = 0, scale=None) -> None:
        start, stop = self.rank * self.local_in, (self.rank + 1) * self.local_in
        as_stored = stored_fp8(source, scale, "a linear weight")
        if as_stored and self.weight_scale is None:
            raise CheckpointError("an FP8 checkpoint loads into an FP8 model only")
        if self.weight_scale is None or as_stored:
            own_scale = None if self.weight_scale is None else self.weight_scale.data
            copy_rows(self.weight.data, own_scale, source[:, start:stop], scale[:] if as_stored else None)
            return
        # quantized here: each row's scale covers the whole row, so read whole rows (in blocks)
        rows = self.weight.shape[0]
        block = max(1, ROW_BLOCK_BYTES // (4 * self.in_features))
        for r in range(0, rows, block):
            full = source[r:r + block].to(self.weight.device)
            q, s = quantize_rows(full)
            self.weight.data[r:r + block].copy_(q[:, start:stop])
            self.weight_scale.data[r:r + block].copy_(s)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """reduce=False: this rank's partial product, summed later by the norm that follows
        (TPGroup.all_reduce_add_rms_norm)."""
        partial = self.matmul(x, self.weight, self.weight_scale)
        return self.tp.all_reduce(partial) if reduce else partial
