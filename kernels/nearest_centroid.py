"""Nearest codebook entry by Euclidean distance (both audio tokenizers' quantisers).

argmin_k ||x - e_k||^2 = argmin_k (||e_k||^2 - 2 x.e_k): the row norm of x does not change the
winner, so it is never computed. Ties go to the lowest index, as torch.argmin does. The Triton
kernel streams the codebook in tiles and keeps a running (min, argmin) per row, so the
[rows, codebook] distance matrix is never written out; all arithmetic is float32 (IEEE dot).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import use_triton


def nearest_centroid_reference(x: torch.Tensor, codebook: torch.Tensor,
                               codebook_sqnorm: torch.Tensor | None = None) -> torch.Tensor:
    x = x.float()
    e = codebook.float()
    if codebook_sqnorm is None:
        codebook_sqnorm = e.pow(2).sum(-1)
    scores = codebook_sqnorm[None, :] - 2.0 * (x @ e.T)
    return scores.argmin(dim=-1)


@triton.jit
def _nearest_centroid_kernel(X, E, SQ, Out, N, K, D, stride_x, stride_e,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            d_ok = dims < D
            x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + dims[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            e = tl.load(E + cols[:, None].to(tl.int64) * stride_e + dims[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(x, tl.trans(e), input_precision="ieee")
        sq = tl.load(SQ + cols, mask=col_ok, other=float("inf"))
        score = sq[None, :] - 2.0 * acc
        score = tl.where(col_ok[None, :], score, float("inf"))
        tile_best = tl.min(score, axis=1)
        tile_idx = tl.argmin(score, axis=1, tie_break_left=True) + k0
        better = tile_best < best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    tl.store(Out + rows, best_idx.to(tl.int64), mask=row_ok)


def _nearest_centroid_triton(x, codebook, sqnorm):
    n, d = x.shape
    k = codebook.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    codebook = codebook if codebook.stride(-1) == 1 else codebook.contiguous()
    out = torch.empty(n, dtype=torch.long, device=x.device)
    if n == 0:
        return out
    block_n, block_k, block_d = 32, 64, 64
    _nearest_centroid_kernel[(triton.cdiv(n, block_n),)](
        x, codebook, sqnorm.float().contiguous(), out, n, k, d, x.stride(0), codebook.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return out


def nearest_centroid(x: torch.Tensor, codebook: torch.Tensor,
                     codebook_sqnorm: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest row of `codebook` [K, D] for each row of `x` [N, D] (int64 [N])."""
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_centroid: x {tuple(x.shape)} and codebook {tuple(codebook.shape)} "
                         "must be [N, D] and [K, D]")
    if codebook_sqnorm is None:
        codebook_sqnorm = codebook.float().pow(2).sum(-1)
    if use_triton(x):
        return _nearest_centroid_triton(x, codebook, codebook_sqnorm)
    return nearest_centroid_reference(x, codebook, codebook_sqnorm)
