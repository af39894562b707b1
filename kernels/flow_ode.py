"""One Euler step of the flow-matching ODE with classifier-free guidance (SPEC.md §3.5 step 5).

The estimator runs on a doubled batch [conditional; unconditional]; per element

    x_new = x + dt * ((1 + w) * v_cond * m - w * v_uncond * m)

with m the frame mask. Eager PyTorch in bf16 rounds after every operation; the kernel rounds the
intermediates the same way (in the dtype of x), so the fused step reproduces the eager solver bit
for bit in bf16/fp16 and is exact float32 math otherwise. Optionally the new x is also written into
channels [0, C) of both halves of the next estimator input (the concat [x, mu, spks, cond]), which
removes the per-step torch.cat of the reference solver.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .backend import use_triton
from .pdl import pdl_launch_options


def cfg_euler_step_reference(v, x, mask, dt: float, cfg_rate: float, out=None, next_input=None):
    """Eager formulation, operation by operation as the official solver (Python-float scalars,
    dt a 0-d tensor of x's dtype; a float dt is turned into one, a device tensor avoids the copy)."""
    b = x.shape[0]
    mask = mask.to(v.dtype)
    v_cond, v_uncond = v[:b] * mask, v[b:] * mask
    direction = (1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond
    step = dt.to(x.dtype) if isinstance(dt, torch.Tensor) else torch.tensor(dt, dtype=x.dtype, device=x.device)
    new = x + step * direction
    if out is None:
        out = new
    else:
        out.copy_(new)
    if next_input is not None:
        c = x.shape[1]
        next_input[:b, :c].copy_(out)
        next_input[b:, :c].copy_(out)
    return out


@triton.jit
def _cfg_euler_kernel(V, X, M, XO, NI, C, L, B,
                      sv_b, sv_c, sx_b, sx_c, sm_b, so_b, so_c, sn_b, sn_c,
                      dt, w1, w, HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:                      # kernels/pdl.py: wait for the estimator's last kernel
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)            # b * C + c
    b = (row // C).to(tl.int64)
    c = (row % C).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = cols < L
    dtype = XO.dtype.element_ty
    m = tl.load(M + b * sm_b + cols, mask=inb, other=0.0).to(tl.float32)
    vc = tl.load(V + b * sv_b + c * sv_c + cols, mask=inb, other=0.0).to(tl.float32)
    vu = tl.load(V + (b + B) * sv_b + c * sv_c + cols, mask=inb, other=0.0).to(tl.float32)
    x = tl.load(X + b * sx_b + c * sx_c + cols, mask=inb, other=0.0).to(tl.float32)
    # each product/sum rounded to the storage dtype, as eager bf16 ops do (no-op for float32)
    vc = (vc * m).to(dtype).to(tl.float32)
    vu = (vu * m).to(dtype).to(tl.float32)
    a = (vc * w1).to(dtype).to(tl.float32)
    u = (vu * w).to(dtype).to(tl.float32)
    d = (a - u).to(dtype).to(tl.float32)
    step = (d * dt).to(dtype).to(tl.float32)
    y = (x + step).to(dtype)
    tl.store(XO + b * so_b + c * so_c + cols, y, mask=inb)
    if HAS_NEXT:
        tl.store(NI + b * sn_b + c * sn_c + cols, y.to(NI.dtype.element_ty), mask=inb)
        tl.store(NI + (b + B) * sn_b + c * sn_c + cols, y.to(NI.dtype.element_ty), mask=inb)


def cfg_euler_step(v: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, dt: float, cfg_rate: float,
                   out: torch.Tensor | None = None, next_input: torch.Tensor | None = None, *,
                   backend: str = "auto", pdl: bool = True) -> torch.Tensor:
    """v: [2B, C, L] estimator output (cond rows then uncond rows); x: [B, C, L]; mask: [B, 1, L].
    dt must be representable in x's dtype (the solver passes the dtype-rounded schedule).
    Returns `out` (new tensor when None; may alias x). With `next_input` [2B, >=C, L] the result is
    also copied into next_input[:, :C] for both halves."""
    bsz, c, length = x.shape
    if v.shape != (2 * bsz, c, length):
        raise ValueError(f"cfg_euler_step: v must be [{2 * bsz}, {c}, {length}], got {list(v.shape)}")
    if mask.shape != (bsz, 1, length):
        raise ValueError(f"cfg_euler_step: mask must be [{bsz}, 1, {length}], got {list(mask.shape)}")
    if next_input is not None and (next_input.shape[0] != 2 * bsz or next_input.shape[2] != length
                                   or next_input.shape[1] < c):
        raise ValueError("cfg_euler_step: next_input must be [2B, >=C, L]")
    if not use_triton(x, backend):
        return cfg_euler_step_reference(v, x, mask, dt, cfg_rate, out, next_input)
    if out is None:
        out = torch.empty_like(x)
    for t in (v, x, mask, out) + ((next_input,) if next_input is not None else ()):
        if t.stride(-1) != 1:
            raise ValueError("cfg_euler_step: tensors must be contiguous along time")
    ni = next_input if next_input is not None else out
    block = min(triton.next_power_of_2(length), 1024)
    grid = (bsz * c, triton.cdiv(length, block))
    _cfg_euler_kernel[grid](v, x, mask, out, ni, c, length, bsz,
                            v.stride(0), v.stride(1), x.stride(0), x.stride(1), mask.stride(0),
                            out.stride(0), out.stride(1), ni.stride(0), ni.stride(1),
                            float(dt), float(1.0 + cfg_rate), float(cfg_rate),
                            HAS_NEXT=next_input is not None, BLOCK=block, num_warps=4,
                            **pdl_launch_options(x, pdl))
    return out
