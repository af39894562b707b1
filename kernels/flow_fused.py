"""Fused elementwise chains of the flow estimator (the U-Net of SPEC.md §3.3/§3.5).

group_norm_mish: the tail of every ResnetBlock1D half,
    y = Mish(GroupNorm(x)) * m            (Block1D: norm, activation, output mask)
    y = (y + temb[:, :, None]) * m        (block1: add the time embedding; block2 masks its input)
    y = y + residual                      (block2: the res_conv branch)
GroupNorm statistics cover only frames with m = 1, so a sequence padded to a length bucket gives
the same valid frames as the unpadded one (the official model runs unpadded with m = 1). Two
launches: partial (count, mean, M2) per (row, group, time tile), then one elementwise pass that
merges the partials (Chan's formula) and applies everything else; eager PyTorch needs five or six.

add_layer_norm: residual stream update plus the LayerNorm that follows it in a transformer block,
    r = x + residual (rounded to the dtype, as eager adds in bf16); y = LayerNorm(r).

Math in float32, one rounding at the end (eager rounds after each op: differences stay within
one bf16 ulp of the output).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .backend import use_triton
from .pdl import pdl_launch_options


# ----------------------------------------------------------------------------- GroupNorm + Mish
def group_norm_mish_reference(x, weight, bias, num_groups: int, eps: float, mask=None, temb=None, residual=None):
    """x: [N, C, L]; mask: [N, 1, L] of 0/1 or None; temb: [N, C] or [C]; residual: [N, C, L]."""
    xf = x.float()
    n, c, length = x.shape
    if mask is None:
        y = F.group_norm(xf, num_groups, weight.float(), bias.float(), eps)
    else:
        m = mask.float()
        g = xf.view(n, num_groups, c // num_groups, length)
        mg = m.view(n, 1, 1, length)
        count = mg.sum(dim=(2, 3), keepdim=True).clamp(min=1) * (c // num_groups)
        mean = (g * mg).sum(dim=(2, 3), keepdim=True) / count
        var = (((g - mean) * mg) ** 2).sum(dim=(2, 3), keepdim=True) / count
        y = ((g - mean) * torch.rsqrt(var + eps)).view(n, c, length)
        y = y * weight.float()[None, :, None] + bias.float()[None, :, None]
    y = F.mish(y)
    if mask is not None:
        y = y * mask.float()
    if temb is not None:
        t = temb.float().reshape(-1, c)
        y = y + t[:, :, None]
        if mask is not None:
            y = y * mask.float()
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


@triton.jit
def _gn_partial_kernel(X, M, P, C, L, CG, S, sx_n, sx_c, sm_n,
                       HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    ng = tl.program_id(0)            # n * G + g
    s = tl.program_id(1)             # time tile
    G = C // CG
    n = (ng // G).to(tl.int64)
    g = (ng % G).to(tl.int64)
    ch = tl.arange(0, BLOCK_C)
    cols = s * BLOCK_L + tl.arange(0, BLOCK_L)
    cmask = ch < CG
    lmask = cols < L
    ptr = X + n * sx_n + (g * CG + ch)[:, None] * sx_c + cols[None, :]
    x = tl.load(ptr, mask=cmask[:, None] & lmask[None, :], other=0.0).to(tl.float32)
    if HAS_MASK:
        m = tl.load(M + n * sm_n + cols, mask=lmask, other=0.0).to(tl.float32)
    else:
        m = tl.where(lmask, 1.0, 0.0)
    w2 = (m[None, :] * tl.where(cmask, 1.0, 0.0)[:, None])
    cnt = tl.sum(tl.sum(w2, axis=1), axis=0)
    mean = tl.sum(tl.sum(x * w2, axis=1), axis=0) / tl.maximum(cnt, 1.0)
    d = (x - mean) * w2
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    base = P + (ng * S + s) * 3
    tl.store(base, cnt)
    tl.store(base + 1, mean)
    tl.store(base + 2, m2)


@triton.jit
def _gn_mish_apply_kernel(X, M, P, W, Bi, T, R, Out, C, L, CG, S, eps,
                          sx_n, sx_c, sm_n, st_n, sr_n, sr_c, so_n, so_c,
                          HAS_MASK: tl.constexpr, HAS_TEMB: tl.constexpr, HAS_RES: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)           # n * C + c
    n = (row // C).to(tl.int64)
    c = (row % C).to(tl.int64)
    G = C // CG
    ng = n * G + c // CG
    # merge the per-tile partials of this (n, group)
    sidx = tl.arange(0, BLOCK_S)
    smask = sidx < S
    pb = P + (ng * S + sidx) * 3
    cnt = tl.load(pb, mask=smask, other=0.0)
    mu = tl.load(pb + 1, mask=smask, other=0.0)
    m2 = tl.load(pb + 2, mask=smask, other=0.0)
    total = tl.maximum(tl.sum(cnt, axis=0), 1.0)
    mean = tl.sum(cnt * mu, axis=0) / total
    dev = mu - mean
    var = (tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)) / total
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + c).to(tl.float32)
    b = tl.load(Bi + c).to(tl.float32)

    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    lmask = cols < L
    x = tl.load(X + n * sx_n + c * sx_c + cols, mask=lmask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * w + b
    # Mish = y * tanh(softplus(y)) = y * e(e+2) / (e(e+2) + 2) with e = exp(y); y > 20: Mish(y) = y
    e = tl.exp(tl.minimum(y, 20.0))
    q = e * (e + 2.0)
    y = tl.where(y > 20.0, y, y * q / (q + 2.0))
    if HAS_MASK:
        m = tl.load(M + n * sm_n + cols, mask=lmask, other=0.0).to(tl.float32)
        y = y * m
    if HAS_TEMB:
        y = y + tl.load(T + n * st_n + c).to(tl.float32)
        if HAS_MASK:
            y = y * m
    if HAS_RES:
        y = y + tl.load(R + n * sr_n + c * sr_c + cols, mask=lmask, other=0.0).to(tl.float32)
    tl.store(Out + n * so_n + c * so_c + cols, y.to(Out.dtype.element_ty), mask=lmask)


def group_norm_mish(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-5,
                    mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                    residual: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Mish(GroupNorm(x)) with optional frame mask, per-channel time-embedding add and residual.
    x: [N, C, L]; mask: [N, 1, L]; temb: [N, C] or [C]; residual: [N, C, L]. Returns [N, C, L]."""
    n, c, length = x.shape
    if c % num_groups:
        raise ValueError(f"group_norm_mish: {c} channels not divisible by {num_groups} groups")
    if mask is not None and mask.shape != (n, 1, length):
        raise ValueError(f"group_norm_mish: mask must be [{n}, 1, {length}], got {list(mask.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError("group_norm_mish: residual must match x")
    if temb is not None and temb.numel() not in (c, n * c):
        raise ValueError(f"group_norm_mish: temb must have {c} or {n * c} elements")
    if not use_triton(x, backend):
        return group_norm_mish_reference(x, weight, bias, num_groups, eps, mask, temb, residual)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cg = c // num_groups
    block_c = triton.next_power_of_2(cg)
    block_l = max(16, min(triton.next_power_of_2(length), 4096 // block_c))
    tiles = triton.cdiv(length, block_l)
    partial = torch.empty(n * num_groups * tiles * 3, dtype=torch.float32, device=x.device)
    m = mask if mask is not None else x
    if mask is not None and mask.stride(-1) != 1:
        m = mask = mask.contiguous()
    _gn_partial_kernel[(n * num_groups, tiles)](
        x, m, partial, c, length, cg, tiles, x.stride(0), x.stride(1), m.stride(0),
        HAS_MASK=mask is not None, BLOCK_C=block_c, BLOCK_L=block_l, num_warps=4)
    out = torch.empty_like(x)
    t = temb.reshape(-1, c) if temb is not None else x
    t_stride = (0 if t.shape[0] == 1 else t.stride(0)) if temb is not None else 0
    r = residual if residual is not None else x
    if residual is not None and r.stride(-1) != 1:
        r = r.contiguous()
    block = min(triton.next_power_of_2(length), 1024)
    _gn_mish_apply_kernel[(n * c, triton.cdiv(length, block))](
        x, m, partial, weight, bias, t, r, out, c, length, cg, tiles, eps,
        x.stride(0), x.stride(1), m.stride(0), t_stride, r.stride(0), r.stride(1), out.stride(0), out.stride(1),
        HAS_MASK=mask is not None, HAS_TEMB=temb is not None, HAS_RES=residual is not None,
        BLOCK_S=max(triton.next_power_of_2(tiles), 2), BLOCK=block, num_warps=4)
    return out


# ----------------------------------------------------------------------------- add + LayerNorm
def add_layer_norm_reference(x, residual, weight, bias, eps: float):
    """r = x + residual (in x's dtype); returns (LayerNorm(r), r)."""
    r = x + residual
    return F.layer_norm(r, (r.shape[-1],), weight, bias, eps), r


@triton.jit
def _add_ln_kernel(X, R, W, Bi, Y, RO, N, sx, sr, sy, sro, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cm = cols < N
    x = tl.load(X + row * sx + cols, mask=cm, other=0.0).to(tl.float32)
    r = tl.load(R + row * sr + cols, mask=cm, other=0.0).to(tl.float32)
    s = (x + r).to(RO.dtype.element_ty)
    tl.store(RO + row * sro + cols, s, mask=cm)
    sf = s.to(tl.float32)
    mean = tl.sum(sf, axis=0) / N
    d = tl.where(cm, sf - mean, 0.0)
    var = tl.sum(d * d, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(Bi + cols, mask=cm, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=cm)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., D]. Returns (LayerNorm(x + residual), x + residual) as new tensors."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError("add_layer_norm: x and residual must match in shape and dtype")
    if not use_triton(x, backend):
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    r2 = residual.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    ro = torch.empty_like(y)
    block = triton.next_power_of_2(d)
    _add_ln_kernel[(x2.shape[0],)](x2, r2, weight, bias, y, ro, d, x2.stride(0), r2.stride(0),
                                   y.stride(0), ro.stride(0), eps, BLOCK=block,
                                   num_warps=min(max(block // 256, 1), 8))
    return y.view(x.shape), ro.view(x.shape)


# ----------------------------------------------------------------------------- GroupNorm + Mish, channels last
def group_norm_mish_rows_reference(x, weight, bias, num_groups: int, eps: float, mask=None, temb=None,
                                   residual=None):
    """Channels-last form of group_norm_mish_reference: x, residual [N, L, C]; mask [N, L]."""
    m = None if mask is None else mask.reshape(mask.shape[0], 1, -1)
    r = None if residual is None else residual.transpose(1, 2)
    return group_norm_mish_reference(x.transpose(1, 2), weight, bias, num_groups, eps, m, temb,
                                     r).transpose(1, 2).contiguous()


# elements (rows x channels) per program of the channels-last apply: 8 rows of 256 channels. Short
# sequences need the programs (H200, 2 x 176 x 256: 2.2 us vs 4.9 us at 8192 elements).
GN_ROWS_ELEMENTS = 2048


@triton.jit
def _gn_rows_apply_kernel(X, P, W, Bi, T, R, M, Y, L, C, S, eps,
                          sx_n, sx_l, sr_n, sr_l, sy_n, sy_l, st_n, sm_n, sm_l,
                          G: tl.constexpr, CG: tl.constexpr,
                          HAS_MASK: tl.constexpr, HAS_TEMB: tl.constexpr, HAS_RES: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_L: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:                      # kernels/pdl.py: wait for the row_conv that wrote x and its statistics
        gdc_wait()
        gdc_launch_dependents()
    n = tl.program_id(0).to(tl.int64)
    # merge the (count, mean, M2) partials of every group of sequence n (Chan's formula)
    gi = tl.arange(0, BLOCK_G)
    si = tl.arange(0, BLOCK_S)
    pm = (gi[:, None] < G) & (si[None, :] < S)
    pb = P + ((n * G + gi[:, None]) * S + si[None, :]) * 3
    cnt = tl.load(pb, mask=pm, other=0.0)
    mu = tl.load(pb + 1, mask=pm, other=0.0)
    m2 = tl.load(pb + 2, mask=pm, other=0.0)
    total = tl.maximum(tl.sum(cnt, axis=1), 1.0)
    mean = tl.sum(cnt * mu, axis=1) / total
    dev = tl.where(pm, mu - mean[:, None], 0.0)
    var = (tl.sum(m2, axis=1) + tl.sum(cnt * dev * dev, axis=1)) / total
    rstd = 1.0 / tl.sqrt(var + eps)
    ci = tl.arange(0, BLOCK_C)
    c_ok = ci < C
    sel = (ci[:, None] // CG) == gi[None, :]
    mean_c = tl.sum(tl.where(sel, mean[None, :], 0.0), axis=1)
    rstd_c = tl.sum(tl.where(sel, rstd[None, :], 0.0), axis=1)
    w = tl.load(W + ci, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(Bi + ci, mask=c_ok, other=0.0).to(tl.float32)

    rows = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = rows < L
    ok = r_ok[:, None] & c_ok[None, :]
    x = tl.load(X + n * sx_n + rows[:, None] * sx_l + ci[None, :], mask=ok, other=0.0).to(tl.float32)
    y = (x - mean_c[None, :]) * rstd_c[None, :] * w[None, :] + b[None, :]
    e = tl.exp(tl.minimum(y, 20.0))
    q = e * (e + 2.0)
    y = tl.where(y > 20.0, y, y * q / (q + 2.0))
    if HAS_MASK:
        m = tl.load(M + n * sm_n + rows * sm_l, mask=r_ok, other=0.0).to(tl.float32)
        y = y * m[:, None]
    if HAS_TEMB:
        y = y + tl.load(T + n * st_n + ci, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_MASK:
            y = y * m[:, None]
    if HAS_RES:
        y = y + tl.load(R + n * sr_n + rows[:, None] * sr_l + ci[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + n * sy_n + rows[:, None] * sy_l + ci[None, :], y.to(Y.dtype.element_ty), mask=ok)


def group_norm_mish_rows(x: torch.Tensor, stats, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
                         mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                         residual: torch.Tensor | None = None, *, backend: str = "auto", pdl: bool = True,
                         block_elements: int = GN_ROWS_ELEMENTS) -> torch.Tensor:
    """group_norm_mish on channels-last rows: x [N, L, C] (channels contiguous) as written by
    flow_conv.row_conv with `gn_groups`, whose GroupStats `stats` hold the per-tile statistics
    (taken over the frames of its mask_out, which must be `mask` here); mask [N, L]; temb [N, C] or
    [C]; residual [N, L, C]. Returns a new [N, L, C] tensor."""
    n, length, c = x.shape
    groups = stats.groups
    if mask is not None and mask.dim() == 3:
        mask = mask[:, 0]
    if mask is not None and mask.shape != (n, length):
        raise ValueError(f"group_norm_mish_rows: mask must be [{n}, {length}], got {list(mask.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError("group_norm_mish_rows: residual must match x")
    if temb is not None and temb.numel() not in (c, n * c):
        raise ValueError(f"group_norm_mish_rows: temb must have {c} or {n * c} elements")
    if block_elements < 1:
        raise ValueError(f"group_norm_mish_rows: block_elements must be positive, got {block_elements}")
    if stats.partial is None or not use_triton(x, backend):
        return group_norm_mish_rows_reference(x, weight, bias, groups, eps, mask, temb, residual)
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("group_norm_mish_rows: x and residual must be contiguous along channels")
    out = torch.empty(n, length, c, dtype=x.dtype, device=x.device)
    t = temb.reshape(-1, c) if temb is not None else x
    t_stride = (0 if t.shape[0] == 1 else t.stride(0)) if temb is not None else 0
    r = residual if residual is not None else x
    m = mask if mask is not None else x
    block_c = triton.next_power_of_2(c)
    # rows per program: at most block_elements // block_c (at least one), a power of two (tl.arange)
    rows = max(1, block_elements // block_c)
    block_l = min(triton.next_power_of_2(length), 1 << (rows.bit_length() - 1))
    _gn_rows_apply_kernel[(n, triton.cdiv(length, block_l))](
        x, stats.partial, weight, bias, t, r, m, out, length, c, stats.tiles, eps,
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1), t_stride,
        m.stride(0) if mask is not None else 0, m.stride(1) if mask is not None else 0,
        G=groups, CG=c // groups, HAS_MASK=mask is not None, HAS_TEMB=temb is not None,
        HAS_RES=residual is not None, BLOCK_G=triton.next_power_of_2(groups),
        BLOCK_S=max(triton.next_power_of_2(stats.tiles), 2), BLOCK_C=block_c, BLOCK_L=block_l,
        num_warps=4, **pdl_launch_options(x, pdl))
    return out
