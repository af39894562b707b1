"""Independent float64 implementations of the SPEC formulas, for the kernel tests."""
from __future__ import annotations

import math

import torch


def spec_slopes(num_heads: int) -> list[float]:
    """SPEC.md §2.2, written out again from the text."""
    n = 1
    while n * 2 <= num_heads:
        n *= 2
    slopes = [(2 ** (-8 / n)) ** k for k in range(1, n + 1)]
    slopes += [(2 ** (-4 / n)) ** k for k in range(1, 2 * (num_heads - n), 2)]
    return slopes


def attention_f64(q, k, v, q_pos, k_pos, slopes, scale=None):
    """softmax(q k^T * scale - slope * sqrt(i - j), causal) v in float64; q [n, Hq, D], k/v [m, Hkv, D]."""
    hq, hkv, dim = q.shape[1], k.shape[1], q.shape[2]
    scale = 1 / math.sqrt(dim) if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float64)
    dist = (q_pos[:, None] - k_pos[None, :]).double()
    for h in range(hq):
        g = h // (hq // hkv)            # contiguous grouping of query heads onto KV heads
        scores = (q[:, h].double() @ k[:, g].double().T) * scale
        scores = scores - float(slopes[h]) * dist.clamp(min=0).sqrt()
        scores = scores.masked_fill(dist < 0, float("-inf"))
        out[:, h] = torch.softmax(scores, -1) @ v[:, g].double()
    return out


def scatter_to_pages(rows: torch.Tensor, cache: torch.Tensor, pages: list[int]) -> None:
    """Write rows [n, H, D] into cache [P, H, page, D] following the page list."""
    page = cache.shape[2]
    for j in range(rows.shape[0]):
        cache[pages[j // page], :, j % page] = rows[j]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    assert not torch.isnan(out).any(), "output has NaN (unwritten elements?)"
    return ((out - ref).norm() / ref.norm()).item()
