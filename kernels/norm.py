"""RMSNorm with optional fused residual add (Step1, SPEC.md §2.2).

Math as in the reference model: var = mean(x.float()^2); x * rsqrt(var + eps) computed in float32
and cast back to x's dtype; then the multiply by weight in x's dtype. With a residual, the sum
x + residual is rounded to the dtype first (as the eager model adds in bf16), written back into
`residual`, and normalised.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .backend import use_triton
from .pdl import pdl_launch_options


def rms_norm_reference(x, weight, eps, residual=None):
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (xf * rstd).to(x.dtype) * weight
    return out if residual is None else (out, residual)


@triton.jit
def _rms_norm_kernel(X, R, W, Out, stride_x, stride_r, stride_o, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:                      # kernels/pdl.py: wait for the kernel that wrote x
        gdc_wait()
        gdc_launch_dependents()
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(R + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * (1.0 / tl.sqrt_rn(var + eps))).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    out = (y.to(tl.float32) * w.to(tl.float32)).to(Out.dtype.element_ty)
    tl.store(Out + row * stride_o + cols, out, mask=mask)


def _rms_norm_triton(x, weight, eps, residual, pdl):
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    r2 = x2
    if residual is not None:
        r2 = residual.view(-1, n)  # updated in place: must be a view of the caller's tensor
    block = triton.next_power_of_2(n)
    num_warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, x2.stride(0), r2.stride(0), out.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        **pdl_launch_options(x2, pdl))
    out = out.view(x.shape)
    return out if residual is None else (out, residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             backend: str = "auto", pdl: bool = True):
    """RMSNorm over the last dim. With `residual`: residual <- x + residual (in place), returns
    (norm(residual), residual); without: returns norm(x)."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} != weight size {weight.shape[0]}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("rms_norm: residual must match x in shape and dtype")
        if not residual.is_contiguous():
            raise ValueError("rms_norm: residual is updated in place and must be contiguous")
    if use_triton(x, backend):
        return _rms_norm_triton(x, weight, eps, residual, pdl)
    return rms_norm_reference(x, weight, eps, residual)
