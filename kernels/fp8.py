"""FP8 (e4m3) numbers shared by the kernels and the layers: weights with one scale per output
channel (W8A16), and the format's range (the FP8 KV cache, kv_cache.py, uses it too).

A row w of a weight matrix is stored as q = round_e4m3(w / s) with s = max|w| / 448 (e4m3's
largest finite value), so the row's largest entry lands on the format's largest value (and
dequantizes to itself up to float32 rounding); every other entry is off by at most half a unit in the last place of
e4m3 (3 mantissa bits: a relative error of at most 2^-4), or by at most s * 2^-10 (half the
smallest subnormal step) for entries that fall in e4m3's subnormal range. Rows of zeros keep s = 1.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0
# per-element error bound of quantize-dequantize, relative to the value (normal range) and to the
# row scale (subnormal range)
E4M3_RELATIVE_ERROR = 2.0 ** -4
E4M3_SUBNORMAL_ERROR = 2.0 ** -10


@torch.no_grad()
def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] float8_e4m3fn, scale [N] float32) of a weight [N, K] in any float dtype, computed in
    float32 on the weight's device."""
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / E4M3_MAX, torch.ones_like(absmax))
    q = (w / scale[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight q [N, K] * scale [N] stands for, in `dtype` (computed in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype == FP8_DTYPE
