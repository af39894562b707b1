"""Varlen causal prefill attention with the sqrt-ALiBi bias, GQA, and optional paged prefix.

Each sequence b has n_b new queries at absolute positions ctx_b .. ctx_b + n_b - 1. They attend to
the ctx_b keys already in the paged cache (chunked prefill, prefix caching) and causally to their
own new keys. The bias always uses absolute positions. Cached keys may come from an FP8 cache
(kernels/kv_cache.py): a program serves one head, so its KV head's K scale folds into the score
scale of those tiles and V is dequantized as it is loaded; the new keys are used as given.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .alibi import sqrt_alibi_bias
from .attention_common import (LOG2E, LOG2E_HOST, check_slopes, dot_precision, is_power_of_two, scores_exact,
                               scores_poly, softmax_update)
from .backend import use_triton
from .kv_cache import check_cache_pair, gather_pages, is_fp8_cache


def attention_prefill_reference(q, k, v, cu_seqlens, slopes, scale, k_cache=None, v_cache=None,
                                block_table=None, context_lens=None, k_scale=None, v_scale=None):
    """Plain PyTorch, float32 math, one sequence at a time."""
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    ctxs = context_lens.tolist() if context_lens is not None else [0] * (len(bounds) - 1)
    for b, ctx in enumerate(ctxs):
        lo, hi = bounds[b], bounds[b + 1]
        if hi == lo:
            continue
        keys, values = k[lo:hi], v[lo:hi]
        if ctx:
            keys = torch.cat([gather_pages(k_cache, block_table[b], ctx, k_scale).float(), keys.float()])
            values = torch.cat([gather_pages(v_cache, block_table[b], ctx, v_scale).float(), values.float()])
        keys = keys.float().repeat_interleave(hq // hkv, dim=1)
        values = values.float().repeat_interleave(hq // hkv, dim=1)
        q_pos = torch.arange(ctx, ctx + hi - lo, device=q.device)
        k_pos = torch.arange(0, ctx + hi - lo, device=q.device)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), keys) * scale
        scores = scores + sqrt_alibi_bias(slopes.float(), q_pos, k_pos)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out


@triton.jit
def _load_new_kv(k_base, v_base, q_start, n0, kvh, offs_n, offs_d, q_len, stride_kt, stride_vt,
                 D: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """K and V rows n0 .. n0 + BLOCK_N - 1 of the current sequence's new tokens."""
    if USE_TMA:
        # rows past the sequence belong to the next one (masked by the caller) or are zero-filled
        k = k_base.load([q_start + n0, kvh * D])
        v = v_base.load([q_start + n0, kvh * D])
    else:
        kidx = n0 + offs_n
        if MASKED:
            kmask = (kidx < q_len)[:, None]
            k = tl.load(k_base + kidx[:, None] * stride_kt + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(v_base + kidx[:, None] * stride_vt + offs_d[None, :], mask=kmask, other=0.0)
        else:
            k = tl.load(k_base + kidx[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + kidx[:, None] * stride_vt + offs_d[None, :])
    return k, v


@triton.jit
def _cached_kv(k, v, v_scale, dtype: tl.constexpr, KV_FP8: tl.constexpr):
    """Cached K/V tiles in the queries' dtype: FP8 K as is (its scale is in the score scale), FP8 V
    dequantized (it shares the accumulator with the new tokens' V)."""
    if KV_FP8:
        k = k.to(dtype)
        v = (v.to(tl.float32) * v_scale).to(dtype)
    return k, v


@triton.jit(do_not_specialize=["stride_bt"])   # the block-table width changes from step to step
def _prefill_kernel(Q, K, V, O, Slopes, CuSeqlens, KC, VC, BlockTable, ContextLens, KScale, VScale, qk_scale,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_cp, stride_ch, stride_cs, stride_bt,
                    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, HAS_CONTEXT: tl.constexpr, POLY_DIST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, POLY_DEGREE: tl.constexpr,
                    KV_FP8: tl.constexpr):
    h = tl.program_id(0)
    seq = tl.program_id(2)
    q_start = tl.load(CuSeqlens + seq)
    q_len = tl.load(CuSeqlens + seq + 1) - q_start
    # heads vary fastest and the longest query blocks come first: the causal tail of short blocks
    # fills the end of the launch, and the heads of one KV group read the same keys together
    m_block = tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(1)
    if m_block < 0:
        return
    m_start = m_block * BLOCK_M
    kvh = h // GROUP
    ctx = 0
    if HAS_CONTEXT:
        ctx = tl.load(ContextLens + seq)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    if USE_TMA:  # Q, K, V are tensor descriptors over [tokens, heads * D] (Hopper's bulk copy engine)
        q = Q.load([q_start + m_start, h * D])
    else:
        q_ptrs = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        q = tl.load(q_ptrs, mask=(offs_m < q_len)[:, None], other=0.0)
    coef = -tl.load(Slopes + h) * LOG2E
    qpos = (ctx + offs_m).to(tl.float32)
    e = (BLOCK_N - 1) * 0.5 - offs_n.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    if HAS_CONTEXT:
        # keys 0..ctx-1 from the paged cache; every one is visible to every row of the block
        ctx_qk_scale = qk_scale
        v_scale = 1.0
        if KV_FP8:
            ctx_qk_scale = qk_scale * tl.load(KScale + kvh)
            v_scale = tl.load(VScale + kvh)
        poly_end = 0
        if POLY_DIST > 0:
            lim = ctx + m_start - POLY_DIST - BLOCK_N + 1
            poly_end = tl.minimum(tl.where(lim >= 0, (lim // BLOCK_N + 1) * BLOCK_N, 0),
                                  tl.cdiv(ctx, BLOCK_N) * BLOCK_N)
            for n0 in range(0, poly_end, BLOCK_N):
                kidx = n0 + offs_n
                kmask = kidx < ctx
                page = tl.load(BlockTable + seq * stride_bt + kidx // PAGE, mask=kmask, other=0).to(tl.int64)
                base = page * stride_cp + kvh * stride_ch + (kidx % PAGE) * stride_cs
                k = tl.load(KC + base[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
                v = tl.load(VC + base[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
                k, v = _cached_kv(k, v, v_scale, q.dtype, KV_FP8)
                s = scores_poly(q, k, qpos, n0 + (BLOCK_N - 1) * 0.5, e, ctx_qk_scale, coef, DOT_PRECISION,
                                POLY_DEGREE)
                s = tl.where(kmask[None, :], s, float("-inf"))
                acc, l_i, m_i = softmax_update(acc, l_i, m_i, s, v, False, DOT_PRECISION)
        for n0 in range(poly_end, ctx, BLOCK_N):
            kidx = n0 + offs_n
            kmask = kidx < ctx
            page = tl.load(BlockTable + seq * stride_bt + kidx // PAGE, mask=kmask, other=0).to(tl.int64)
            base = page * stride_cp + kvh * stride_ch + (kidx % PAGE) * stride_cs
            k = tl.load(KC + base[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
            v = tl.load(VC + base[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
            k, v = _cached_kv(k, v, v_scale, q.dtype, KV_FP8)
            s = scores_exact(q, k, qpos, kidx.to(tl.float32), ctx_qk_scale, coef, DOT_PRECISION)
            s = tl.where(kmask[None, :], s, float("-inf"))
            acc, l_i, m_i = softmax_update(acc, l_i, m_i, s, v, False, DOT_PRECISION)

    # the new keys, at positions ctx + j: full tiles strictly below the diagonal first
    k_base = K
    v_base = V
    if not USE_TMA:
        k_base = K + q_start.to(tl.int64) * stride_kt + kvh * stride_kh
        v_base = V + q_start.to(tl.int64) * stride_vt + kvh * stride_vh
    exact_start = 0
    if POLY_DIST > 0:
        lim = m_start - POLY_DIST - BLOCK_N + 1
        exact_start = tl.minimum(tl.where(lim >= 0, (lim // BLOCK_N + 1) * BLOCK_N, 0), m_start)
        for n0 in range(0, exact_start, BLOCK_N):
            k, v = _load_new_kv(k_base, v_base, q_start, n0, kvh, offs_n, offs_d, q_len, stride_kt, stride_vt,
                                D, False, USE_TMA)
            s = scores_poly(q, k, qpos, ctx + n0 + (BLOCK_N - 1) * 0.5, e, qk_scale, coef, DOT_PRECISION,
                            POLY_DEGREE)
            acc, l_i, m_i = softmax_update(acc, l_i, m_i, s, v, False, DOT_PRECISION)
    for n0 in range(exact_start, m_start, BLOCK_N):
        k, v = _load_new_kv(k_base, v_base, q_start, n0, kvh, offs_n, offs_d, q_len, stride_kt, stride_vt,
                            D, False, USE_TMA)
        s = scores_exact(q, k, qpos, (ctx + n0 + offs_n).to(tl.float32), qk_scale, coef, DOT_PRECISION)
        acc, l_i, m_i = softmax_update(acc, l_i, m_i, s, v, False, DOT_PRECISION)
    # tiles on the diagonal: causal mask and the end of the sequence
    for n0 in range(m_start, tl.minimum(m_start + BLOCK_M, q_len), BLOCK_N):
        kidx = n0 + offs_n
        k, v = _load_new_kv(k_base, v_base, q_start, n0, kvh, offs_n, offs_d, q_len, stride_kt, stride_vt,
                            D, True, USE_TMA)
        s = scores_exact(q, k, qpos, (ctx + kidx).to(tl.float32), qk_scale, coef, DOT_PRECISION)
        visible = (kidx[None, :] <= offs_m[:, None]) & (kidx < q_len)[None, :]
        s = tl.where(visible, s, float("-inf"))
        acc, l_i, m_i = softmax_update(acc, l_i, m_i, s, v, True, DOT_PRECISION)

    o = acc / l_i[:, None]
    o_ptrs = O + q_start.to(tl.int64) * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m < q_len)[:, None])


# Launch configurations by head dim, chosen on an H100 by bench/attention.py (see bench/RESULTS.md).
# POLY_DIST is the smallest key distance at which a tile uses the polynomial square root, of degree
# POLY_DEGREE; the dropped Taylor term is below 6e-4 in logits for these settings (BLOCK_N = 64:
# degree 2 from distance 384, degree 3 from 192). TMA: K/V/Q tiles through tensor descriptors
# (Hopper and newer; the launcher falls back to pointer loads elsewhere).
PREFILL_CONFIGS = {
    64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4, POLY_DIST=384, POLY_DEGREE=2, TMA=True),
    128: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, POLY_DIST=192, POLY_DEGREE=3, TMA=True),
}


def prefill_config(head_dim: int, dtype: torch.dtype, on_cpu: bool) -> dict:
    cfg = dict(PREFILL_CONFIGS.get(head_dim, PREFILL_CONFIGS[128]))
    if on_cpu:  # the interpreter runs each program in numpy: small tiles keep tests quick
        cfg.update(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, POLY_DIST=64, POLY_DEGREE=3, TMA=False)
    if dtype == torch.float32:
        cfg.update(num_stages=min(cfg["num_stages"], 2))
    return cfg


def _tma_usable(device: torch.device, *tensors: torch.Tensor) -> bool:
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def _descriptor(t: torch.Tensor, block_rows: int, dim: int):
    """A TMA descriptor over t [tokens, heads, D] viewed as [tokens, heads * D], tiles [rows, D]."""
    if t.stride(2) != 1 or t.stride(1) != dim:
        raise ValueError("TMA path needs each token's heads packed contiguously")
    return TensorDescriptor(t, [t.shape[0], t.shape[1] * dim], [t.stride(0), 1], [block_rows, dim])


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int | None, slopes: torch.Tensor, scale: float | None = None, *,
                      k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                      block_table: torch.Tensor | None = None, context_lens: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, config: dict | None = None,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """Causal sqrt-ALiBi attention over a varlen batch.

    q [T, Hq, D]; k, v [T, Hkv, D] (the new tokens, packed); cu_seqlens int32 [B+1];
    max_seqlen = max new tokens of a sequence (pass it to avoid a device sync); slopes [Hq]
    (this rank's slice). With context_lens [B] > 0, sequence b's queries sit at positions
    context_lens[b]..., and also attend to keys 0..context_lens[b]-1 read from k_cache/v_cache
    ([pages, Hkv, page_size, D]) through block_table [B, max_pages] int32; an FP8 cache with its
    per-KV-head k_scale, v_scale [Hkv] float32.
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention_prefill: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    hq, hkv, dim = q.shape[1], k.shape[1], q.shape[2]
    if hq % hkv:
        raise ValueError(f"attention_prefill: {hq} query heads do not divide into {hkv} KV heads")
    slopes = check_slopes(slopes, hq, q.device)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    has_context = context_lens is not None
    if has_context:
        if k_cache is None or v_cache is None or block_table is None:
            raise ValueError("attention_prefill: context_lens needs k_cache, v_cache and block_table")
        check_cache_pair(k_cache, v_cache, k_scale, v_scale)
        if block_table.shape[0] != cu_seqlens.shape[0] - 1 or context_lens.shape[0] != block_table.shape[0]:
            raise ValueError("attention_prefill: block_table and context_lens need one row per sequence")
    if not use_triton(q, backend) or not is_power_of_two(dim):
        result = attention_prefill_reference(q, k, v, cu_seqlens, slopes, scale, k_cache, v_cache,
                                             block_table, context_lens, k_scale, v_scale)
        if out is None:
            return result
        out.copy_(result)
        return out
    if out is None:
        out = torch.empty_like(q)
    num_seqs = cu_seqlens.shape[0] - 1
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if num_seqs else 0
    if num_seqs == 0 or max_seqlen == 0:
        return out
    cfg = dict(config) if config else prefill_config(dim, q.dtype, not q.is_cuda)
    block_m = cfg.pop("BLOCK_M")
    use_tma = bool(cfg.pop("TMA", False)) and _tma_usable(q.device, q, k, v)
    cfg.setdefault("POLY_DEGREE", 3)
    qa, ka, va = q, k, v
    if use_tma:
        qa, ka, va = (_descriptor(t, rows, dim) for t, rows in ((q, block_m), (k, cfg["BLOCK_N"]), (v, cfg["BLOCK_N"])))
    kc, vc, bt, cl = (k_cache, v_cache, block_table, context_lens) if has_context else (k, v, cu_seqlens, cu_seqlens)
    cache_strides = (kc.stride(0), kc.stride(1), kc.stride(2)) if has_context else (0, 0, 0)
    fp8 = has_context and is_fp8_cache(k_cache)
    scales = (k_scale, v_scale) if fp8 else (slopes, slopes)
    grid = (hq, triton.cdiv(max_seqlen, block_m), num_seqs)
    _prefill_kernel[grid](
        qa, ka, va, out, slopes, cu_seqlens, kc, vc, bt, cl, *scales, scale * LOG2E_HOST,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        *cache_strides, bt.stride(0) if has_context else 0,
        GROUP=hq // hkv, D=dim, BLOCK_M=block_m, PAGE=kc.shape[2] if has_context else 1,
        HAS_CONTEXT=has_context, DOT_PRECISION=dot_precision(q.dtype), USE_TMA=use_tma, KV_FP8=fp8, **cfg)
    return out
