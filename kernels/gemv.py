"""Skinny matrix products for decode steps: out[M, N] = x[M, K] @ W[N, K]^T with M <= 16.

A decode step of a batch of one reads every weight once for a handful of rows; the product is
bound by streaming W. Each program owns BLOCK_N output rows of W and walks K in BLOCK_K chunks,
keeping the few input rows (padded to 16 for the tensor-core dot) beside them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import use_triton

MAX_M = 16


def linear_small_m_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(X, W, Out, M, N, K, stride_xm, stride_wn, stride_om,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, M_PAD)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < N
    w_ptrs = W + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    x_ptrs = X + ms[:, None] * stride_xm + cols[None, :]
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=rmask[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=(ms < M)[:, None], other=0.0)
        else:
            kmask = (k0 + cols) < K
            w = tl.load(w_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=(ms < M)[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out_ptrs = Out + ms[:, None] * stride_om + rows[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(ms < M)[:, None] & rmask[None, :])


def gemv_config(n: int, k: int) -> dict:
    """Per weight shape, from bench/gemv.py on an H100 (weights rotated so they come from HBM)."""
    if 8192 < n < 32768:                    # fused gate|up
        return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=5)   # qkv, o, down, LM head


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) times weight [N, K]^T, float32 accumulation, output in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"linear_small_m: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if m > MAX_M or not use_triton(x):
        return linear_small_m_reference(x, weight)
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    cfg = dict(config or gemv_config(n, k))
    block_n = cfg.pop("BLOCK_N")
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_N=block_n, M_PAD=16, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg)
    return out
