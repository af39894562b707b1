"""Token embedding rows plus their sums of squares: the first op of a fused decode step.

The step's first product normalises the embedding rows (RMSNorm) from their sums of squares
(kernels/gemv.py, rms_linear_small_m), so the lookup that writes the rows also leaves those sums:
one launch instead of a lookup and a norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .backend import use_triton
from .pdl import pdl_launch_options


def embedding_sumsq_reference(ids: torch.Tensor, weight: torch.Tensor):
    rows = F.embedding(ids, weight)
    return rows, rows.float().pow(2).sum(1)[None, :]


@triton.jit
def _embedding_sumsq_kernel(Ids, W, Out, SqOut, N, stride_w, stride_o, BLOCK: tl.constexpr,
                            USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    if USE_PDL:                      # kernels/pdl.py: the ids may come from the previous kernel
        gdc_wait()
        gdc_launch_dependents()
    token = tl.load(Ids + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    e = tl.load(W + token * stride_w + cols, mask=mask, other=0.0)
    tl.store(Out + row.to(tl.int64) * stride_o + cols, e, mask=mask)
    ef = e.to(tl.float32)
    tl.store(SqOut + row, tl.sum(ef * ef, axis=0))


def embedding_sumsq(ids: torch.Tensor, weight: torch.Tensor, *, backend: str = "auto",
                    pdl: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """rows = weight[ids] ([M, H], a new tensor) and float32 [1, M] sums of squares of each row.
    The ids must lie in [0, vocab): the engine checks token ids before they reach the model."""
    if ids.dim() != 1 or weight.dim() != 2:
        raise ValueError(f"embedding_sumsq: ids [M] and weight [V, H] expected, got {tuple(ids.shape)}, "
                         f"{tuple(weight.shape)}")
    if not use_triton(weight, backend):
        return embedding_sumsq_reference(ids, weight)
    m, n = ids.shape[0], weight.shape[1]
    rows = torch.empty(m, n, dtype=weight.dtype, device=weight.device)
    sumsq = torch.empty(1, m, dtype=torch.float32, device=weight.device)
    if m:
        block = triton.next_power_of_2(n)
        _embedding_sumsq_kernel[(m,)](ids, weight, rows, sumsq, n, weight.stride(0), rows.stride(0), BLOCK=block,
                                      num_warps=min(max(block // 256, 1), 16), **pdl_launch_options(weight, pdl))
    return rows, sumsq
