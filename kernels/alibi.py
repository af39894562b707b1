"""sqrt-ALiBi slopes and bias of Step1 (SPEC.md §2.2).

bias[h, i, j] = -slope_h * sqrt(i - j) for key position j <= query position i, -inf otherwise.
"""
from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """Per-head slopes (float32) of the full model, or the slice owned by one tensor-parallel rank.

    n = 2^floor(log2 H) heads get m0^k (m0 = 2^(-8/n), k = 1..n); the remaining H - n heads get
    m1^k with m1 = 2^(-4/n) and odd k = 1, 3, ..., 2(H-n)-1 (Step1 `build_alibi_cache`).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"invalid tensor-parallel rank {tp_rank} of {tp_size}")
    if num_heads % tp_size:
        raise ValueError(f"{num_heads} heads cannot be split evenly over {tp_size} ranks")
    n = 2 ** math.floor(math.log2(num_heads))
    m0 = 2.0 ** (-8.0 / n)
    slopes = [m0 ** k for k in range(1, n + 1)]
    if n < num_heads:
        m1 = 2.0 ** (-4.0 / n)
        slopes += [m1 ** k for k in range(1, 2 * (num_heads - n), 2)]
    per_rank = num_heads // tp_size
    return torch.tensor(slopes[tp_rank * per_rank:(tp_rank + 1) * per_rank], dtype=torch.float32)


def sqrt_alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bias [H, len(q_pos), len(k_pos)] in the dtype of `slopes`, -inf where k_pos > q_pos."""
    dist = q_pos[:, None].to(slopes.dtype) - k_pos[None, :].to(slopes.dtype)
    bias = -slopes[:, None, None] * dist.clamp(min=0).sqrt()[None]
    return bias.masked_fill((dist < 0)[None], float("-inf"))
