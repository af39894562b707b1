"""Snake activation of the HiFT vocoder (SPEC.md §3.4): y = x + 1/(alpha + 1e-9) * sin(alpha * x)^2.

alpha is per channel (alpha_logscale False in HiFT). Eager PyTorch runs five elementwise kernels
over the [B, C, T] activations (T up to 64 samples per mel frame); this is one read and one write.
An optional frame mask [B, 1, T] multiplies the result (the length-bucketed vocoder zeroes the
samples past each item's end before every convolution; Snake(0) = 0, so masking its output is the
same as masking its input).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import use_triton

NO_DIV_BY_ZERO = 1e-9


def snake_reference(x: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    a = alpha.view(1, -1, 1)
    y = x + (1.0 / (a + NO_DIV_BY_ZERO)) * torch.sin(x * a).pow(2)
    return y if mask is None else y * mask


@triton.jit
def _snake_kernel(X, A, M, Y, C, T, sx_b, sx_c, sy_b, sy_c, sm_b, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = (row // C).to(tl.int64)
    c = (row % C).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < T
    a = tl.load(A + c).to(tl.float32)
    x = tl.load(X + b * sx_b + c * sx_c + cols, mask=m, other=0.0).to(tl.float32)
    s = tl.sin(x * a)
    y = x + (1.0 / (a + 1e-9)) * (s * s)
    if HAS_MASK:
        y = y * tl.load(M + b * sm_b + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + b * sy_b + c * sy_c + cols, y.to(Y.dtype.element_ty), mask=m)


def snake(x: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor | None = None, *,
          backend: str = "auto") -> torch.Tensor:
    """x: [B, C, T]; alpha: [C]; mask: [B, 1, T] or None."""
    if x.dim() != 3 or alpha.numel() != x.shape[1]:
        raise ValueError(f"snake: x must be [B, C, T] with C = alpha.numel(), got {list(x.shape)}, {alpha.numel()}")
    if mask is not None and mask.shape != (x.shape[0], 1, x.shape[2]):
        raise ValueError(f"snake: mask must be [{x.shape[0]}, 1, {x.shape[2]}], got {list(mask.shape)}")
    if not use_triton(x, backend):
        return snake_reference(x, alpha, mask)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if mask is not None and mask.stride(-1) != 1:
        mask = mask.contiguous()
    bsz, c, t = x.shape
    y = torch.empty_like(x)
    m = mask if mask is not None else x
    block = min(triton.next_power_of_2(t), 2048)
    _snake_kernel[(bsz * c, triton.cdiv(t, block))](x, alpha, m, y, c, t, x.stride(0), x.stride(1),
                                                    y.stride(0), y.stride(1), m.stride(0) if mask is not None else 0,
                                                    HAS_MASK=mask is not None, BLOCK=block, num_warps=4)
    return y
