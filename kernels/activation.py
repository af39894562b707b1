"""SiLU-and-mul over a fused [gate | up] projection: silu(gate) * up, float32 math, one rounding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .backend import use_triton
from .pdl import pdl_launch_options


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, N, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:                      # kernels/pdl.py: wait for the kernel that wrote x
        gdc_wait()
        gdc_launch_dependents()
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, backend: str = "auto", pdl: bool = True) -> torch.Tensor:
    """x: [..., 2*I] holding gate then up; returns [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim must be even, got {x.shape[-1]}")
    if not use_triton(x, backend):
        return silu_and_mul_reference(x)
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(n), 1024)
    grid = (x2.shape[0], triton.cdiv(n, block))
    _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block, num_warps=4,
                               **pdl_launch_options(x2, pdl))
    return out.view(*x.shape[:-1], n)
