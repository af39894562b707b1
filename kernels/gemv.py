"""Skinny matrix products for decode steps: out[M, N] = x[M, K] @ W[N, K]^T with M <= 16.

A decode step of a batch of one reads every weight once for a handful of rows; the product is
bound by streaming W. Each program owns BLOCK_N output rows of W and walks a range of K in BLOCK_K
chunks, keeping the few input rows (padded to 16 for the tensor-core dot) beside them.

Split K: a layer of 3072 output rows gives only ~100 programs of 32 rows, fewer than the 132 SMs of
an H100, so those shapes also cut K into SPLIT_K ranges. Each program stores its float32 partial
in its own slot of a workspace; the last program of a row block (an atomic counter tells) adds
the slots in K order, writes the sum in the output dtype and resets the counter for the next
product. The fixed order keeps the result bit-identical run to run (float atomics summing the
partials in arrival order did not: greedy decoding then drifted between identical runs).
Nothing is launched beside the kernel, so it stays one node in a CUDA graph.

With PDL (kernels/pdl.py) each program requests its first weight tile before it waits for the
previous kernel: weights are never written during a step, so that load may overlap the previous
kernel's end. (Prefetching more tiles into L2 that way, and folding SiLU-and-mul into the down
projection's input load, both measured slower on an H100; an L2 bulk prefetch of up to 8-32 MB
of each product's weights before the wait made a whole H200 step 0.1-0.5 ms slower.)

FP8 weights (W8A16): W may be float8_e4m3fn with a float32 scale per row (`scale`); each tile is
converted to the activations' dtype before the dot and the row scales multiply the float32 sums.

Epilogues for the fused decode step (below the plain product): scale rows by an RMSNorm factor
from partial sums of squares, SiLU-and-mul of paired gate/up rows, or add the product to the
residual stream in place and leave the new rows' partial sums of squares.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .backend import num_sms, use_triton
from .pdl import pdl_launch_options

MAX_M = 16
WORKSPACE_ELEMENTS = 16 * 65536       # float32 partial sums: SPLIT_K * M * N must fit to split K
MAX_ROW_BLOCKS = 8192                 # counters, one per BLOCK_N rows


def dense(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight an FP8 weight and its row scales stand for, in `dtype` (a plain weight as it is)."""
    return weight if scale is None else (weight.float() * scale.float()[:, None]).to(dtype)


def linear_small_m_reference(x: torch.Tensor, weight: torch.Tensor,
                             scale: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dense(weight, scale, x.dtype))


@triton.jit(do_not_specialize=["M", "num_in_slots"])
def _gemv_kernel(X, W, Scale, NormW, Out, Work, Counters, SqIn, SqOut, M, N, K, stride_xm, stride_wn, stride_om,
                 k_range, num_in_slots, eps,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
                 SPLIT: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr,
                 RMS_IN: tl.constexpr, SLOTS_PAD: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
                 W_SCALE: tl.constexpr, NORM_W: tl.constexpr):
    pid_n = tl.program_id(0)
    k_begin = tl.program_id(1) * k_range
    k_end = tl.minimum(k_begin + k_range, K)
    j = tl.arange(0, BLOCK_N)
    if SILU:
        # W holds gate rows [0, N/2) then up rows [N/2, N); tile column 2c is gate row, 2c + 1 the
        # up row, of output column pid_n * BLOCK_N / 2 + c
        first = pid_n * (BLOCK_N // 2)
        rows = first + j // 2 + (j % 2) * (N // 2)
        rmask = (first + j // 2) < N // 2
    else:
        rows = pid_n * BLOCK_N + j
        rmask = rows < N
    ms = tl.arange(0, M_PAD)
    cols = tl.arange(0, BLOCK_K)
    mmask = ms < M
    w_base = W + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    x_base = X + ms[:, None] * stride_xm + cols[None, :]
    # the first weight tile does not depend on any earlier kernel: ask for it before waiting
    if EVEN_K:
        w = tl.load(w_base + k_begin, mask=rmask[:, None], other=0.0)
    else:
        kmask = (k_begin + cols) < k_end
        w = tl.load(w_base + k_begin, mask=rmask[:, None] & kmask[None, :], other=0.0)
    if RESIDUAL:
        # the residual rows this program adds to were written two or more kernels back, which had
        # completed before this kernel could start (the kernel just before waited for them): safe
        # to request before the wait, so the epilogue does not wait for them
        previous = tl.load(Out + ms[:, None] * stride_om + rows[None, :], mask=mmask[:, None] & rmask[None, :],
                           other=0.0)
    else:
        previous = tl.zeros([M_PAD, BLOCK_N], Out.dtype.element_ty)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    if EVEN_K:
        x = tl.load(x_base + k_begin, mask=mmask[:, None], other=0.0)
    else:
        x = tl.load(x_base + k_begin, mask=mmask[:, None] & kmask[None, :], other=0.0)
    if NORM_W:
        x = _norm_weighted(x, NormW, k_begin, cols, K)
    if RMS_IN:
        # RMSNorm of the input rows: their sums of squares come in partial sums from the kernel that
        # wrote them, requested here and added (in a fixed order) after the loop; the norm's weight
        # is folded into W's columns
        slots = tl.arange(0, SLOTS_PAD)
        sq = tl.load(SqIn + slots[:, None] * M + ms[None, :],
                     mask=(slots[:, None] < num_in_slots) & mmask[None, :], other=0.0)
    else:
        sq = tl.zeros([SLOTS_PAD, M_PAD], tl.float32)
    acc = tl.dot(x, tl.trans(w.to(x.dtype)), tl.zeros([M_PAD, BLOCK_N], tl.float32))
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_base + k0, mask=rmask[:, None], other=0.0)
            x = tl.load(x_base + k0, mask=mmask[:, None], other=0.0)
        else:
            kmask = (k0 + cols) < k_end
            w = tl.load(w_base + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(x_base + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        if NORM_W:
            x = _norm_weighted(x, NormW, k0, cols, K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if W_SCALE:
        acc = acc * tl.load(Scale + rows, mask=rmask, other=1.0)[None, :]
    if RMS_IN:
        rstd = 1.0 / tl.sqrt_rn(tl.sum(sq, axis=0) / K + eps)
    else:
        rstd = tl.full([M_PAD], 1.0, tl.float32)
    if SPLIT:
        omask = mmask[:, None] & rmask[None, :]
        slot = Work + ms[:, None] * N + rows[None, :]          # slot s of Work: [s * M * N, (s + 1) * M * N)
        tl.store(slot + tl.program_id(1) * M * N, acc, mask=omask)
        tl.debug_barrier()
        done = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(1) - 1:
            total = tl.zeros([M_PAD, BLOCK_N], tl.float32)
            for s in range(tl.num_programs(1)):
                total += tl.load(slot + s * M * N, mask=omask, other=0.0, cache_modifier=".cg")
            _gemv_epilogue(total, rstd, previous, Out, SqOut, M, N, stride_om, pid_n, ms, mmask, rows, rmask,
                           BLOCK_N, RMS_IN, SILU, RESIDUAL)
            tl.atomic_xchg(Counters + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        _gemv_epilogue(acc, rstd, previous, Out, SqOut, M, N, stride_om, pid_n, ms, mmask, rows, rmask,
                       BLOCK_N, RMS_IN, SILU, RESIDUAL)


@triton.jit
def _norm_weighted(x, NormW, k0, cols, K):
    """x's columns times the RMSNorm weight (for weights the norm is not folded into: FP8 ones,
    whose row scales a fold would change)."""
    g = tl.load(NormW + k0 + cols, mask=(k0 + cols) < K, other=0.0)
    return (x.to(tl.float32) * g.to(tl.float32)[None, :]).to(x.dtype)


@triton.jit
def _gemv_epilogue(acc, rstd, previous, Out, SqOut, M, N, stride_om, pid_n, ms, mmask, rows, rmask,
                   BLOCK_N: tl.constexpr, RMS_IN: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr):
    """Writes the finished product tile: scaled by the input rows' RMSNorm factor, reduced to
    silu(gate) * up, or added to the residual stream held in Out (whose new rows' partial sums of
    squares go to SqOut, one slot per program, for the next normalised product)."""
    y = acc
    if RMS_IN:
        y = y * rstd[:, None]
    if SILU:
        gate, up = tl.split(tl.reshape(y, [y.shape[0], BLOCK_N // 2, 2]))
        y = gate / (1.0 + tl.exp(-gate)) * up
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        cmask = cols < N // 2
    else:
        cols = rows
        cmask = rmask
    omask = mmask[:, None] & cmask[None, :]
    out_ptrs = Out + ms[:, None] * stride_om + cols[None, :]
    if RESIDUAL:
        # rounded as the unfused step rounds: the product to the dtype, then the sum
        product = y.to(Out.dtype.element_ty).to(tl.float32)
        y = (product + previous.to(tl.float32)).to(Out.dtype.element_ty).to(tl.float32)
        tl.store(SqOut + pid_n * M + ms, tl.sum(y * y, axis=1), mask=mmask)
    tl.store(out_ptrs, y.to(Out.dtype.element_ty), mask=omask)


_WORK: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial-sum slots and zeroed counters, allocated once per device (CUDA graphs keep
    their addresses, so they are never reallocated); every split product leaves the counters zero
    and writes each slot it reads first."""
    buf = _WORK.get(device)
    if buf is None:
        buf = (torch.zeros(WORKSPACE_ELEMENTS, dtype=torch.float32, device=device),
               torch.zeros(MAX_ROW_BLOCKS, dtype=torch.int32, device=device))
        _WORK[device] = buf
    return buf


SMEM_TILE_BUDGET = 160 << 10      # bytes of weight tiles in flight per program (Hopper: 227 KiB of shared memory)


def gemv_config(n: int, k: int, sm_count: int = 132, weight_bytes: int = 2) -> dict:
    """Tile and K split per weight shape (bench/gemv.py on an H100, weights streamed from HBM,
    products back to back as in a decode step). `weight_bytes`: the weight's element size; float32
    weights (fp32 engines on a GPU) keep fewer tiles in flight so that they fit shared memory."""
    cfg = _shape_config(n, k, sm_count)
    fits = SMEM_TILE_BUDGET // (cfg["BLOCK_N"] * cfg["BLOCK_K"] * weight_bytes)
    cfg["num_stages"] = max(1, min(cfg["num_stages"], fits))
    return cfg


def _shape_config(n: int, k: int, sm_count: int) -> dict:
    if n > 8192:                            # fused gate|up and the LM head fill the GPU already
        return dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=3 if n < 32768 else 5)
    # qkv and o_proj: six stages keep five weight tiles in flight per program from its start (H200,
    # whole decode step: 2.10 ms/token with 6, 2.18 with 5, 2.12 with 7; bench/llm.py --config-sweep)
    cfg = dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=6)
    blocks = triton.cdiv(n, cfg["BLOCK_N"])
    if k >= 8192 and blocks < sm_count:
        # down_proj (K = 8192, ~100 row blocks): six K ranges beat one (18.8 vs 20.4 us); for
        # qkv and o_proj (K = 3072) the merge costs more than the extra programs bring
        cfg.update(SPLIT_K=min(k // (4 * cfg["BLOCK_K"]), triton.cdiv(4 * sm_count, blocks)), num_stages=3)
    return cfg


def _check(x: torch.Tensor, weight: torch.Tensor, what: str, scale: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{what}: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if scale is not None and (weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32
                              or tuple(scale.shape) != (weight.shape[0],)):
        raise ValueError(f"{what}: row scales go with a float8_e4m3fn weight, as float32 [{weight.shape[0]}]; got "
                         f"a {weight.dtype} weight and {scale.dtype} {tuple(scale.shape)} scales")
    if scale is None and weight.dtype == torch.float8_e4m3fn:
        raise ValueError(f"{what}: a float8_e4m3fn weight needs its row scales")


def _launch(x, weight, out, config, *, scale=None, norm_weight=None, sumsq_in=None, eps=0.0, silu=False,
            add_to_out=False, pdl=True):
    """One product into `out`; with add_to_out, out is the residual it adds to, and the new rows'
    partial sums of squares (float32 [row blocks, M]) are returned."""
    m, k = x.shape
    n = weight.shape[0]
    cfg = dict(config or gemv_config(n, k, num_sms(x.device), weight.element_size()))
    block_n, block_k = cfg.pop("BLOCK_N"), cfg["BLOCK_K"]
    blocks = triton.cdiv(n // 2 if silu else n, block_n // 2 if silu else block_n)
    split = cfg.pop("SPLIT_K", 1)
    # each K range is a whole number of tiles, and none is empty
    k_range = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_range)
    if split * m * n > WORKSPACE_ELEMENTS or blocks > MAX_ROW_BLOCKS:
        split, k_range = 1, k
    work, counters = _workspace(x.device) if split > 1 else (out, out)
    slots = sumsq_in.shape[0] if sumsq_in is not None else 1
    sumsq_out = torch.empty(blocks, m, dtype=torch.float32, device=x.device) if add_to_out else None
    _gemv_kernel[(blocks, split)](
        x, weight, scale if scale is not None else out, norm_weight if norm_weight is not None else out, out, work,
        counters, sumsq_in if sumsq_in is not None else out,
        sumsq_out if sumsq_out is not None else out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        k_range, slots, eps,
        BLOCK_N=block_n, M_PAD=16, SPLIT=split > 1, EVEN_K=k % block_k == 0,
        RMS_IN=sumsq_in is not None, SLOTS_PAD=max(16, triton.next_power_of_2(slots)), SILU=silu,
        RESIDUAL=add_to_out, W_SCALE=scale is not None, NORM_W=norm_weight is not None, **cfg,
        **pdl_launch_options(x, pdl))
    return sumsq_out


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                   config: dict | None = None, *, scale: torch.Tensor | None = None, backend: str = "auto",
                   pdl: bool = True) -> torch.Tensor:
    """x [M, K] (M <= 16) times weight [N, K]^T, float32 accumulation, output in x's dtype; `scale`:
    float32 [N] row scales of a float8_e4m3fn weight."""
    _check(x, weight, "linear_small_m", scale)
    m = x.shape[0]
    if m > MAX_M or not use_triton(x, backend):
        return linear_small_m_reference(x, weight, scale)
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, weight.shape[0], dtype=x.dtype, device=x.device)
    if m:
        _launch(x, weight, out, config, scale=scale, pdl=pdl)
    return out


# ------------------------------------------------------------------ fused decode-step products
# A decode step of one GPU keeps the residual stream in one buffer: the products that end a
# sub-block (o_proj, down_proj) add themselves to it in their epilogue and leave per-block sums of
# squares of its new rows; the products that start one (qkv, gate|up) normalise from those sums
# (the RMSNorm weight folded into their columns beforehand) and gate|up also applies SiLU-and-mul.
# That removes the step's RMSNorm and SiLU launches (3 of 8 per layer).

def rms_linear_small_m_reference(x, weight, sumsq, eps, silu_and_mul=False, scale=None, norm_weight=None):
    rstd = torch.rsqrt(sumsq.float().sum(0) / x.shape[1] + eps)
    x = x.float() if norm_weight is None else x.float() * norm_weight.float()
    y = F.linear(x, dense(weight, scale, torch.float32).float()) * rstd[:, None]
    if silu_and_mul:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y.to(x.dtype)


def rms_linear_small_m(x: torch.Tensor, weight: torch.Tensor, sumsq: torch.Tensor, eps: float, *,
                       silu_and_mul: bool = False, config: dict | None = None, scale: torch.Tensor | None = None,
                       norm_weight: torch.Tensor | None = None, backend: str = "auto",
                       pdl: bool = True) -> torch.Tensor:
    """RMSNorm(x) W^T for x [M, K] the un-normalised residual rows (M <= 16) and W [N, K] with the
    norm's weight already multiplied into its columns; sumsq [S, M] float32 holds partial sums of
    x's squares per row (from linear_small_m_add_ or embedding_sumsq). With silu_and_mul, W's rows
    are [gate; up] and the result is silu(gate) * up, [M, N / 2]. `scale`: as linear_small_m;
    `norm_weight` [K]: the norm's weight applied to x here instead (W not folded: FP8 weights)."""
    _check(x, weight, "rms_linear_small_m", scale)
    m, n = x.shape[0], weight.shape[0]
    if sumsq.dim() != 2 or sumsq.shape[1] != m or sumsq.dtype != torch.float32:
        raise ValueError(f"rms_linear_small_m: sumsq must be float32 [slots, {m}], got "
                         f"{sumsq.dtype} {tuple(sumsq.shape)}")
    if silu_and_mul and n % 2:
        raise ValueError(f"rms_linear_small_m: silu_and_mul needs an even row count, got {n}")
    if m > MAX_M or not use_triton(x, backend):
        return rms_linear_small_m_reference(x, weight, sumsq, eps, silu_and_mul, scale, norm_weight)
    x, sumsq = x.contiguous(), sumsq.contiguous()
    out = torch.empty(m, n // 2 if silu_and_mul else n, dtype=x.dtype, device=x.device)
    if m:
        _launch(x, weight, out, config, scale=scale, norm_weight=norm_weight, sumsq_in=sumsq, eps=eps,
                silu=silu_and_mul, pdl=pdl)
    return out


def linear_small_m_add_reference(x, weight, residual, scale=None):
    residual.copy_(F.linear(x, dense(weight, scale, x.dtype)) + residual)
    return residual.float().pow(2).sum(1)[None, :]


def linear_small_m_add_(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                        config: dict | None = None, *, scale: torch.Tensor | None = None, backend: str = "auto",
                        pdl: bool = True) -> torch.Tensor:
    """residual += x W^T in place (the product rounded to the dtype, then the sum, as separate ops
    would round), for x [M, K] (M <= 16); returns float32 [S, M] partial sums of squares of the new
    residual rows, which rms_linear_small_m takes. With PDL the kernel reads `residual` before it
    waits for the kernel launched just before it, so that kernel must not be the one that wrote
    `residual` (in the decode step it is two or three launches back; kernels/pdl.py). `scale`: as
    linear_small_m."""
    _check(x, weight, "linear_small_m_add_", scale)
    m, n = x.shape[0], weight.shape[0]
    if residual.shape != (m, n) or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"linear_small_m_add_: residual must be a contiguous {x.dtype} [{m}, {n}], got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if m > MAX_M or not use_triton(x, backend):
        return linear_small_m_add_reference(x, weight, residual, scale)
    if m == 0:
        return torch.zeros(1, 0, dtype=torch.float32, device=x.device)
    return _launch(x.contiguous(), weight, residual, config, scale=scale, add_to_out=True, pdl=pdl)
