"""Convolutions and linears over channels-last sequences, with their neighbours fused (the flow
estimator of SPEC.md §3.3/§3.5).

row_conv computes, for every sequence n and output row o of x [N, L_in, K] (rows = frames,
channels contiguous or not: any strides),

    y[n, o, :] = sum_t  xin[n, i(o, t), :] @ W[p, t]      (+ bias)
    i(o, t)    = j * in_step + t * dil + off + p * phase_off,   o = j * out_step + p

with rows outside [0, L_in) read as zeros (zero padding, never crossing into the next sequence).
One spec covers the estimator's ops: a Linear (1 tap), Conv1d k3 (stride 1 or 2, padding 1) and
the ConvTranspose1d k4 s2 p1 of Upsample1D (2 phases of 2 taps). Weights are prepared once as
[phases, taps, K, Nout] (linear_weight / conv_weight / upsample_weight).

Fused around the matmul (each optional):
  prologue  xin = x * mask_in[n, i]          frame mask of the input (padded frames read as 0)
            xin = LayerNorm(x)                over all K channels (1 tap, K <= 512), rounded to x's dtype
  epilogue  + bias; GELU (exact erf) of the dtype-rounded value; + residual (after rounding, as an
            eager `f + x` in the dtype); * mask_out[n, o]; and GroupNorm partial statistics
            (count, mean, M2) per (sequence, group, row tile) over the frames with mask_out = 1,
            taken from the stored (rounded) output, for group_norm_mish_rows.
Every rounding an eager bf16 module chain makes between these ops is made here too, so results
stay within one rounding of the unfused path. Matmuls accumulate in float32 (IEEE for float32
inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .backend import use_triton
from .pdl import pdl_launch_options


@dataclass(frozen=True)
class RowConvSpec:
    taps: int = 1
    phases: int = 1
    in_step: int = 1
    dil: int = 1
    off: int = 0
    phase_off: int = 0
    out_step: int = 1

    def out_length(self, l_in: int) -> int:
        if self.phases == 1:
            return (l_in - 2 * self.off - self.dil * (self.taps - 1) - 1) // self.in_step + 1
        return l_in * self.out_step

    def rows_per_phase(self, l_out: int) -> int:
        return -(-l_out // self.out_step)


LINEAR = RowConvSpec()
UPSAMPLE_K4S2P1 = RowConvSpec(taps=2, phases=2, in_step=1, dil=-1, off=0, phase_off=1, out_step=2)


def conv_spec(kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> RowConvSpec:
    return RowConvSpec(taps=kernel, in_step=stride, dil=dilation, off=-padding)


def linear_weight(w: torch.Tensor) -> torch.Tensor:
    """nn.Linear weight [Nout, K] (or a 1x1 Conv1d [Nout, K, 1]) -> [1, 1, K, Nout]."""
    if w.dim() == 3:
        w = w[:, :, 0]
    return w.t().contiguous()[None, None]


def conv_weight(w: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d weight [Nout, K, taps] -> [1, taps, K, Nout]."""
    return w.permute(2, 1, 0).contiguous()[None]


def upsample_weight(w: torch.Tensor) -> torch.Tensor:
    """nn.ConvTranspose1d(k=4, stride=2, padding=1) weight [K, Nout, 4] -> [2, 2, K, Nout]:
    output row 2j + p takes input rows j + p - t through kernel tap 1 - p + 2t."""
    if w.shape[-1] != 4:
        raise ValueError("upsample_weight: expects a kernel of 4 taps (k4 s2 p1)")
    return torch.stack([torch.stack([w[:, :, 1 - p + 2 * t] for t in range(2)]) for p in range(2)]).contiguous()


@dataclass
class GroupStats:
    """GroupNorm partials of a row_conv output: partial [N * G * tiles * 3] float32 (None when the
    reference ran: group_norm_mish_rows then reduces the output itself)."""
    partial: torch.Tensor | None
    tiles: int
    groups: int


# ----------------------------------------------------------------------------- reference
def _matmul_rows(xf, weight, spec: RowConvSpec, l_out: int) -> torch.Tensor:
    """The float32 sum over taps of the spec, through torch's matmul / conv1d where they express it."""
    phases, taps, _, n_out = weight.shape
    if spec == LINEAR:
        return xf @ weight[0, 0]
    if phases == 1 and spec.off <= 0 and spec.dil > 0:
        return F.conv1d(xf.transpose(1, 2), weight[0].permute(2, 1, 0), stride=spec.in_step, padding=-spec.off,
                        dilation=spec.dil).transpose(1, 2)
    n, l_in, _ = xf.shape
    acc = torch.zeros(n, l_out, n_out, dtype=torch.float32, device=xf.device)
    for p in range(phases):
        j = torch.arange(spec.rows_per_phase(l_out), device=xf.device)
        o = j * spec.out_step + p
        keep = o < l_out
        j, o = j[keep], o[keep]
        part = torch.zeros(n, j.numel(), n_out, dtype=torch.float32, device=xf.device)
        for t in range(taps):
            i = j * spec.in_step + t * spec.dil + spec.off + p * spec.phase_off
            ok = ((i >= 0) & (i < l_in)).float()
            part = part + (xf[:, i.clamp(0, l_in - 1)] * ok[None, :, None]) @ weight[p, t]
        acc[:, o] = part
    return acc


def row_conv_reference(x, weight, bias=None, spec: RowConvSpec = LINEAR, *, mask_in=None, ln=None, gelu=False,
                       residual=None, mask_out=None, mul_mask_out=False, out=None):
    n, l_in, k = x.shape
    phases, taps, _, n_out = weight.shape
    l_out = spec.out_length(l_in)
    dtype = x.dtype
    xin = x if mask_in is None else x * mask_in[:, :, None].to(dtype)
    if ln is not None:
        xin = F.layer_norm(xin, (k,), ln[0], ln[1], ln[2])
    acc = _matmul_rows(xin.float(), weight.float(), spec, l_out)
    y = acc
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y.to(dtype).float())
    if residual is not None:
        y = y.to(dtype).float() + residual.float()
    if mask_out is not None and mul_mask_out:
        y = y * mask_out[:, :, None].float()
    y = y.to(dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _row_conv_kernel(X, W, Bias, R, Y, MI, MO, P, LNW, LNB,
                     L_in, L_out, J, K, N, S, PH, GS,
                     sx_n, sx_l, sx_k, sw_p, sw_t, sw_k,
                     sr_n, sr_l, sr_c, sy_n, sy_l, sy_c, smi_n, smi_l, smo_n, smo_l,
                     in_step, dil, off, phase_off, out_step, ln_eps,
                     TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MI: tl.constexpr, HAS_LN: tl.constexpr,
                     GELU: tl.constexpr, HAS_RES: tl.constexpr, HAS_MO: tl.constexpr, MUL_MO: tl.constexpr,
                     STATS: tl.constexpr, CG: tl.constexpr, PRECISION: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:                      # kernels/pdl.py: wait for the kernels that wrote x / residual
        gdc_wait()
        gdc_launch_dependents()
    pid0 = tl.program_id(0)
    seq = (pid0 // PH).to(tl.int64)
    phase = pid0 % PH
    tile = tl.program_id(1)
    pid_n = tl.program_id(2)
    rows = tile * BM + tl.arange(0, BM)                      # j
    o = rows * out_step + phase
    row_ok = (rows < J) & (o < L_out)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_base = X + seq * sx_n
    w_base = W + phase * sw_p
    for t in tl.static_range(TAPS):
        i = rows * in_step + t * dil + off + phase * phase_off
        i_ok = row_ok & (i >= 0) & (i < L_in)
        if HAS_MI:
            mi = tl.load(MI + seq * smi_n + i * smi_l, mask=i_ok, other=0.0)
        for k0 in range(0, K, BK):
            k_ok = (k0 + kk) < K
            a = tl.load(x_base + i[:, None] * sx_l + (k0 + kk)[None, :] * sx_k,
                        mask=i_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_MI:
                a = a * mi[:, None].to(a.dtype)
            if HAS_LN:                                       # one K step: the whole row is here
                af = a.to(tl.float32)
                mean = tl.sum(af, axis=1) / K
                d = tl.where(k_ok[None, :], af - mean[:, None], 0.0)
                var = tl.sum(d * d, axis=1) / K
                rstd = 1.0 / tl.sqrt(var + ln_eps)
                lw = tl.load(LNW + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
                lb = tl.load(LNB + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
                a = (d * rstd[:, None] * lw[None, :] + lb[None, :]).to(X.dtype.element_ty)
            w = tl.load(w_base + t * sw_t + (k0 + kk)[:, None] * sw_k + cols[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    dt = Y.dtype.element_ty
    y = acc
    if HAS_BIAS:
        y = y + tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = y.to(dt).to(tl.float32)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    ok2 = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        res = tl.load(R + seq * sr_n + o[:, None] * sr_l + cols[None, :] * sr_c, mask=ok2, other=0.0)
        y = y.to(dt).to(tl.float32) + res.to(tl.float32)
    if HAS_MO:
        mo = tl.load(MO + seq * smo_n + o * smo_l, mask=row_ok, other=0.0).to(tl.float32)
        if MUL_MO:
            y = y * mo[:, None]
    out = y.to(dt)
    tl.store(Y + seq * sy_n + o[:, None] * sy_l + cols[None, :] * sy_c, out, mask=ok2)
    if STATS:
        NG: tl.constexpr = BN // CG
        wr = tl.where(row_ok, 1.0, 0.0)
        if HAS_MO:
            wr = wr * mo
        w2 = wr[:, None] * tl.where(col_ok, 1.0, 0.0)[None, :]
        yf = out.to(tl.float32) * w2
        cnt = tl.sum(tl.sum(tl.reshape(w2, (BM, NG, CG)), axis=2), axis=0)
        mean_g = tl.sum(tl.sum(tl.reshape(yf, (BM, NG, CG)), axis=2), axis=0) / tl.maximum(cnt, 1.0)
        dev = (tl.reshape(out.to(tl.float32), (BM, NG, CG)) - mean_g[None, :, None]) * tl.reshape(w2, (BM, NG, CG))
        m2 = tl.sum(tl.sum(dev * dev, axis=2), axis=0)
        G = GS                                               # groups of the first GS * CG channels
        g = pid_n * NG + tl.arange(0, NG)
        g_ok = g < G
        base = P + ((seq * G + g) * S + tile) * 3
        tl.store(base, cnt, mask=g_ok)
        tl.store(base + 1, mean_g, mask=g_ok)
        tl.store(base + 2, m2, mask=g_ok)


# (BM, BN, BK, num_warps, num_stages) by kind; TILES_LONG[kind] = (rows, tiles) replaces them from
# `rows` rows per sequence on. Chosen from `bench/vocoder.py --sections ops` on an H100 (each op
# alone at 2 x 176 / 352 / 560 / 1120 rows, the lengths of a first streamed window and of 10 s).
TILES = {
    "ln": (32, 128, None, 4, 1),        # LayerNorm prologue: BK = whole row, one K step
    "wide": (64, 128, 64, 4, 3),        # 1 tap, Nout >= 512
    "narrow": (64, 64, 64, 4, 3),       # 1 tap, Nout < 512
    "conv": (64, 64, 64, 4, 3),         # several taps
}
TILES_LONG = {
    "ln": (500, (64, 256, None, 8, 1)),
    "narrow": (800, (64, 128, 64, 4, 3)),
}
# TILES_SHORT[kind] = [(rows, tiles), ...] ascending: the first band with at most `rows` rows per
# sequence replaces TILES. A first streamed window (2 x 176 / 352 rows) is latency-bound: narrower
# column tiles and deeper K steps give more programs and fewer serial iterations. From
# `bench/vocoder.py --sections tune_short` on an H200 (2026-12-04; us per op, default -> kept:
# qkv+ff1 at 176 rows 10.9 -> 9.7, out+ff2 10.9 -> 7.7, conv3+conv1|res 14.7 -> 12.8).
TILES_SHORT: dict[str, list] = {
    "ln": [(256, (16, 128, None, 4, 1))],
    "narrow": [(384, (64, 32, 128, 4, 3))],
    "conv": [(384, (64, 32, 64, 4, 3))],
}


def tile_kind(n_out: int, ln: bool, taps: int) -> str:
    return "ln" if ln else ("conv" if taps > 1 else ("wide" if n_out >= 512 else "narrow"))


def table_tiles(kind: str, rows: int) -> tuple:
    """(BM, BN, BK, num_warps, num_stages) of the tables above for `rows` rows per sequence."""
    for max_rows, short in TILES_SHORT.get(kind, ()):
        if rows <= max_rows:
            return short
    long_rows, long_tiles = TILES_LONG.get(kind, (None, None))
    return long_tiles if long_rows is not None and rows >= long_rows else TILES[kind]


def _tiles(n_out: int, ln: bool, k: int, rows: int, taps: int, elem_bytes: int, tiles: tuple | None):
    bm, bn, bk, warps, stages = tiles or table_tiles(tile_kind(n_out, ln, taps), rows)
    if elem_bytes > 2:                  # float32 operands: half the tile width, fewer stages (shared memory)
        bn, stages = min(bn, 64), min(stages, 2)
    bk = max(16, triton.next_power_of_2(k)) if ln else bk
    bm = max(16, min(bm, triton.next_power_of_2(rows)))
    bn = max(16, min(bn, triton.next_power_of_2(n_out)))
    bk = max(16, min(bk, triton.next_power_of_2(k)))
    return bm, bn, bk, warps, stages


def _mask_rows(mask, n, length, what):
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask[:, 0]
    if mask.shape != (n, length):
        raise ValueError(f"row_conv: {what} must be [{n}, {length}], got {list(mask.shape)}")
    return mask


def row_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             spec: RowConvSpec = LINEAR, *, mask_in=None, ln=None, gelu: bool = False, residual=None,
             mask_out=None, mul_mask_out: bool = False, gn_groups: int = 0, stats_channels: int | None = None,
             out: torch.Tensor | None = None, tiles: tuple | None = None, backend: str = "auto", pdl: bool = True):
    """x: [N, L_in, K] (any strides); weight [phases, taps, K, Nout] (linear_weight / conv_weight /
    upsample_weight); bias [Nout]; mask_in [N, L_in] (or [N, 1, L_in]); ln = (weight, bias, eps);
    residual [N, L_out, Nout]; mask_out [N, L_out]: multiplies the output when mul_mask_out, and
    selects the frames of the GroupNorm statistics; gn_groups > 0: also return GroupStats of the
    first `stats_channels` output channels (all by default; fewer when one product computes a
    normalised output beside an unnormalised one, as ResnetBlock1D's conv1 and res_conv).
    out: optional [N, L_out, Nout] destination (any strides, e.g. a transposed channel-first view).
    tiles: (BM, BN, BK, num_warps, num_stages) instead of the tables' choice (tests and tile sweeps).
    Returns y (and GroupStats when gn_groups)."""
    n, l_in, k = x.shape
    phases, taps, wk, n_out = weight.shape
    if wk != k or phases != spec.phases or taps != spec.taps:
        raise ValueError(f"row_conv: weight {list(weight.shape)} does not fit x {list(x.shape)} / {spec}")
    l_out = spec.out_length(l_in)
    mask_in = _mask_rows(mask_in, n, l_in, "mask_in")
    mask_out = _mask_rows(mask_out, n, l_out, "mask_out")
    if residual is not None and residual.shape != (n, l_out, n_out):
        raise ValueError(f"row_conv: residual must be [{n}, {l_out}, {n_out}], got {list(residual.shape)}")
    if out is not None and out.shape != (n, l_out, n_out):
        raise ValueError(f"row_conv: out must be [{n}, {l_out}, {n_out}], got {list(out.shape)}")
    if ln is not None and (taps != 1 or k > 512):
        raise ValueError("row_conv: the LayerNorm prologue needs one tap and K <= 512")
    stats_channels = n_out if stats_channels is None else stats_channels
    if gn_groups and (stats_channels % gn_groups or not 0 < stats_channels <= n_out or phases != 1):
        raise ValueError("row_conv: GroupNorm statistics need stats_channels (<= Nout) divisible by the groups "
                         "and one phase")
    if not use_triton(x, backend):
        y = row_conv_reference(x, weight, bias, spec, mask_in=mask_in, ln=ln, gelu=gelu, residual=residual,
                               mask_out=mask_out, mul_mask_out=mul_mask_out, out=out)
        return (y, GroupStats(None, 0, gn_groups)) if gn_groups else y
    y = out if out is not None else torch.empty(n, l_out, n_out, dtype=x.dtype, device=x.device)
    if weight.stride(-1) != 1 or weight.dtype != x.dtype:
        raise ValueError("row_conv: weight must be contiguous along Nout and in x's dtype")
    j = spec.rows_per_phase(l_out)
    cg = stats_channels // gn_groups if gn_groups else 1
    bm, bn, bk, warps, stages = _tiles(n_out, ln is not None, k, j, taps, x.element_size(), tiles)
    if gn_groups:
        bn = max(bn, triton.next_power_of_2(cg))
        if bn % cg:
            raise ValueError(f"row_conv: group size {cg} must divide the channel tile {bn}")
    tiles = triton.cdiv(j, bm)
    partial = torch.empty(n * gn_groups * tiles * 3, dtype=torch.float32, device=x.device) if gn_groups else y
    dummy = y
    r = residual if residual is not None else dummy
    mi = mask_in if mask_in is not None else dummy
    mo = mask_out if mask_out is not None else dummy
    lnw, lnb, eps = ln if ln is not None else (dummy, dummy, 0.0)
    grid = (n * phases, tiles, triton.cdiv(n_out, bn))
    _row_conv_kernel[grid](
        x, weight, bias if bias is not None else dummy, r, y, mi, mo, partial, lnw, lnb,
        l_in, l_out, j, k, n_out, tiles, phases, gn_groups,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), weight.stride(2),
        r.stride(0) if residual is not None else 0, r.stride(1) if residual is not None else 0,
        r.stride(2) if residual is not None else 0,
        y.stride(0), y.stride(1), y.stride(2),
        mi.stride(0) if mask_in is not None else 0, mi.stride(1) if mask_in is not None else 0,
        mo.stride(0) if mask_out is not None else 0, mo.stride(1) if mask_out is not None else 0,
        spec.in_step, spec.dil, spec.off, spec.phase_off, spec.out_step, float(eps),
        TAPS=taps, HAS_BIAS=bias is not None, HAS_MI=mask_in is not None, HAS_LN=ln is not None,
        GELU=gelu, HAS_RES=residual is not None, HAS_MO=mask_out is not None, MUL_MO=mul_mask_out,
        STATS=gn_groups > 0, CG=cg, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages, **pdl_launch_options(x, pdl))
    return (y, GroupStats(partial, tiles, gn_groups)) if gn_groups else y
