"""Pieces shared by the prefill and decode attention kernels.

Scores are kept in log2 space: s = qk * scale * log2(e) - slope * log2(e) * sqrt(i - j), so the
softmax needs one exp2 per score and the slope folds into one multiply-add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E_HOST = 1.4426950408889634
LOG2E = tl.constexpr(LOG2E_HOST)  # usable inside @triton.jit functions


@triton.jit
def softmax_update(acc, l_i, m_i, s, v, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step: fold scores s [M, N] (log2 space) and values v [N, D] into acc."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # a row that has seen no visible key yet keeps m = -inf; use 0 so that exp2 gives 0, not NaN
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def scores_exact(q, k, qpos, kpos, qk_scale, coef, DOT_PRECISION: tl.constexpr):
    """qk * scale + coef * sqrt(qpos - kpos), one square root per score (clamped at 0)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    dist = tl.maximum(qpos[:, None] - kpos[None, :], 0.0)
    return qk * qk_scale + coef * tl.sqrt(dist)


@triton.jit
def scores_poly(q, k, qpos, k_center, e, qk_scale, coef, DOT_PRECISION: tl.constexpr, DEGREE: tl.constexpr = 3):
    """Same scores for a tile far from the diagonal, without a square root per score.

    With C = qpos - k_center (the row's distance to the tile's centre key) and e = k_center - kpos
    (a per-column constant), sqrt(C + e) = sqrt(C) * (1 + t/2 - t^2/8 + t^3/16 - ...), t = e / C.
    The per-row coefficients cost one rsqrt per row; each score then costs three FMAs (Horner) on
    the FP32 pipe instead of a special-function op. Callers only use it where |t| is small enough
    that the dropped t^4 term stays far below bf16 resolution (see POLY_DIST in the launchers).
    """
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    c = qpos - k_center
    rs = tl.math.rsqrt(c)
    r = rs * rs
    c0 = coef * c * rs
    c1 = c0 * r * 0.5
    c2 = c1 * r * -0.25
    ee = e[None, :]
    if DEGREE == 2:
        poly = (c2[:, None] * ee + c1[:, None]) * ee + c0[:, None]
    else:
        c3 = c2 * r * -0.5
        poly = ((c3[:, None] * ee + c2[:, None]) * ee + c1[:, None]) * ee + c0[:, None]
    return qk * qk_scale + poly


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (the default would round them to tf32)
    return "ieee" if dtype == torch.float32 else "tf32"


def check_slopes(slopes: torch.Tensor, num_heads: int, device: torch.device) -> torch.Tensor:
    if slopes.shape != (num_heads,):
        raise ValueError(f"need one slope per query head ({num_heads}), got shape {tuple(slopes.shape)}")
    return slopes.to(device=device, dtype=torch.float32)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
