"""Decode attention over the paged KV cache: one new query per sequence, sqrt-ALiBi, GQA.

Split-KV (flash-decoding): the keys of a sequence are cut into up to `num_splits` ranges handled
by separate programs, so that a batch of one still fills the GPU; the last program of a sequence
and KV head to finish merges the partial results (an atomic counter tells which), so there is no
second kernel. One program serves all query heads of a KV group, so each K/V page is read once
per group, and the square root of each key distance is computed once and reused by those heads.
The query of sequence b sits at position seq_lens[b] - 1; its own K/V must already be written.
An FP8 cache is read as is: a program serves one KV head, so that head's K scale folds into the
score scale and its V scale into the output.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .alibi import sqrt_alibi_bias
from .attention_common import LOG2E, LOG2E_HOST, check_slopes, dot_precision, is_power_of_two, softmax_update
from .backend import num_sms, use_triton
from .fp8 import E4M3_MAX
from .kv_cache import cache_value, check_cache_pair, gather_pages, is_fp8_cache, write_kv_reference
from .pdl import pdl_launch_options


def attention_decode_reference(q, k_cache, v_cache, block_table, seq_lens, slopes, scale, k_scale=None, v_scale=None,
                               k_new=None, v_new=None):
    """With k_new, v_new [B, Hkv, D], the newest key of each sequence is theirs (as given, not as
    the cache stores it), like the kernel's."""
    hq, hkv = q.shape[1], k_cache.shape[1]
    out = torch.zeros_like(q)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        keys = gather_pages(k_cache, block_table[b], length, k_scale).float()
        values = gather_pages(v_cache, block_table[b], length, v_scale).float()
        if k_new is not None:
            keys[-1], values[-1] = k_new[b].float(), v_new[b].float()
        keys, values = keys.repeat_interleave(hq // hkv, dim=1), values.repeat_interleave(hq // hkv, dim=1)
        pos = torch.arange(length, device=q.device)
        scores = torch.einsum("hd,khd->hk", q[b].float(), keys) * scale
        scores = scores + sqrt_alibi_bias(slopes.float(), pos[-1:], pos)[:, 0]
        out[b] = torch.einsum("hk,khd->hd", scores.softmax(-1), values).to(q.dtype)
    return out


# one binary whatever the split count and block-table width (they change from step to step)
@triton.jit(do_not_specialize=["num_splits", "min_keys", "stride_bt"])
def _decode_kernel(Q, KC, VC, BlockTable, SeqLens, Slopes, O, OPart, LsePart, Locks, KNew, VNew, NewSlots,
                   KScale, VScale, qk_scale, num_splits, min_keys,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_cp, stride_ch, stride_cs, stride_bt,
                   stride_nb, stride_nh,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE: tl.constexpr, SPLIT: tl.constexpr, HAS_NEW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   USE_PDL: tl.constexpr, KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # sequence lengths, block tables, slopes and the cached keys are written before the step's
    # first kernel, never by the kernel this one follows: they are read before the PDL wait
    seq_len = tl.load(SeqLens + seq)
    # a CUDA graph fixes num_splits for the longest context it serves; a shorter sequence uses
    # only as many ranges as it has MIN_KEYS-key pieces, and the other programs leave at once
    active = tl.maximum(tl.minimum(num_splits, tl.cdiv(seq_len, min_keys)), 1)
    if split < active:
        _decode_program(Q, KC, VC, BlockTable, Slopes, O, OPart, LsePart, Locks, KNew, VNew, NewSlots,
                        KScale, VScale, qk_scale, num_splits, seq, kvh, split, seq_len, active,
                        stride_qb, stride_qh, stride_ob, stride_oh, stride_cp, stride_ch, stride_cs, stride_bt,
                        stride_nb, stride_nh, GROUP, GROUP_PAD, D, BLOCK_N, PAGE, SPLIT, HAS_NEW, DOT_PRECISION,
                        USE_PDL, KV_FP8, FP8_MAX)


@triton.jit
def _load_keys(KC, VC, bt_row, kvh, n0, cached_end, offs_n, offs_d, stride_cp, stride_ch, stride_cs,
               PAGE: tl.constexpr):
    kidx = n0 + offs_n
    kmask = kidx < cached_end
    page = tl.load(bt_row + kidx // PAGE, mask=kmask, other=0).to(tl.int64)
    base = page * stride_cp + kvh * stride_ch + (kidx % PAGE) * stride_cs
    k = tl.load(KC + base[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(VC + base[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
    return k, v, kidx, kmask


@triton.jit
def _attend_keys(q, k, v, kidx, kmask, coef, qpos, qk_scale, acc, l_i, m_i, DOT_PRECISION: tl.constexpr,
                 KV_FP8: tl.constexpr):
    if KV_FP8:                       # exact in q's dtype; the scales are applied by the caller
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    root = tl.sqrt(tl.maximum(qpos - kidx.to(tl.float32), 0.0))   # once per key, for all heads
    s = qk * qk_scale + coef[:, None] * root[None, :]
    s = tl.where(kmask[None, :], s, float("-inf"))
    return softmax_update(acc, l_i, m_i, s, v, True, DOT_PRECISION)


@triton.jit
def _decode_program(Q, KC, VC, BlockTable, Slopes, O, OPart, LsePart, Locks, KNew, VNew, NewSlots,
                    KScale, VScale, qk_scale, num_splits, seq, kvh, split, seq_len, active,
                    stride_qb, stride_qh, stride_ob, stride_oh, stride_cp, stride_ch, stride_cs, stride_bt,
                    stride_nb, stride_nh,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, SPLIT: tl.constexpr, HAS_NEW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    USE_PDL: tl.constexpr, KV_FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    chunk = tl.cdiv(tl.cdiv(seq_len, active), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    cached_end = end
    if HAS_NEW:
        cached_end = tl.minimum(end, seq_len - 1)   # the newest key comes from KNew, not the cache

    rows = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + rows
    hmask = rows < GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    coef = -tl.load(Slopes + heads, mask=hmask, other=0.0) * LOG2E
    qpos = (seq_len - 1).to(tl.float32)
    # FP8 cache: cached keys score with qk_scale * k_scale, and the accumulator sums p * (v / v_scale),
    # so the output takes v_scale once at the end
    cached_qk_scale = qk_scale
    v_scale = 1.0
    if KV_FP8:
        cached_qk_scale = qk_scale * tl.load(KScale + kvh)
        v_scale = tl.load(VScale + kvh)
    bt_row = BlockTable + seq.to(tl.int64) * stride_bt
    # the first tile of cached keys is requested before the wait (a short context has no other)
    k, v, kidx, kmask = _load_keys(KC, VC, bt_row, kvh, start, cached_end, offs_n, offs_d,
                                   stride_cp, stride_ch, stride_cs, PAGE)
    if USE_PDL:                      # kernels/pdl.py: q and the new K/V come from the kernel before
        gdc_wait()
        gdc_launch_dependents()
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
    # the split holding position seq_len - 1 takes the new key from KNew (requested beside q)
    new_here = HAS_NEW & (seq_len > 0) & (start <= seq_len - 1) & (seq_len - 1 < end)
    if HAS_NEW:
        k_new = tl.load(KNew + seq * stride_nb + kvh * stride_nh + offs_d, mask=(offs_d < D) & new_here, other=0.0)
        v_new = tl.load(VNew + seq * stride_nb + kvh * stride_nh + offs_d, mask=(offs_d < D) & new_here, other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    if start < cached_end:
        acc, l_i, m_i = _attend_keys(q, k, v, kidx, kmask, coef, qpos, cached_qk_scale, acc, l_i, m_i, DOT_PRECISION,
                                     KV_FP8)
    for n0 in range(start + BLOCK_N, cached_end, BLOCK_N):
        k, v, kidx, kmask = _load_keys(KC, VC, bt_row, kvh, n0, cached_end, offs_n, offs_d,
                                       stride_cp, stride_ch, stride_cs, PAGE)
        acc, l_i, m_i = _attend_keys(q, k, v, kidx, kmask, coef, qpos, cached_qk_scale, acc, l_i, m_i, DOT_PRECISION,
                                     KV_FP8)

    if HAS_NEW:
        # the new key joins from registers (distance 0, no bias) and is written to its cache slot:
        # no separate KV-write kernel, and no program reads that slot in this launch
        if new_here:
            slot = tl.load(NewSlots + seq).to(tl.int64)
            if slot >= 0:
                dst = (slot // PAGE) * stride_cp + kvh * stride_ch + (slot % PAGE) * stride_cs + offs_d
                k_inv = 1.0
                if KV_FP8:
                    k_inv = 1.0 / tl.load(KScale + kvh)
                tl.store(KC + dst, cache_value(k_new, k_inv, KC, KV_FP8, FP8_MAX))
                tl.store(VC + dst, cache_value(v_new, 1.0 / v_scale, VC, KV_FP8, FP8_MAX))
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.math.exp2(m_i - m_new)
            p_new = tl.math.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            # the new key is attended at full precision (its cache copy is what later steps read)
            acc = acc * alpha[:, None] + p_new[:, None] * (v_new.to(tl.float32) / v_scale)[None, :]
            m_i = m_new

    o = acc * (v_scale / tl.maximum(l_i, 1e-30))[:, None]     # an empty range (padding row) gives 0
    if SPLIT:
        if active > 1:
            # partial result of this key range; the last program of the (sequence, KV head) to finish
            # merges all ranges, so no second kernel is launched
            lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
            part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
            tl.store(LsePart + part, lse, mask=hmask)
            tl.store(OPart + part[:, None] * D + offs_d[None, :], o, mask=hmask[:, None])
            tl.debug_barrier()
            lock = Locks + seq * tl.num_programs(1) + kvh
            done = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
            if done == active - 1:
                tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")     # ready for the next launch
                base_part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits
                m_all = tl.full([GROUP_PAD], float("-inf"), tl.float32)
                w_sum = tl.zeros([GROUP_PAD], tl.float32)
                o_all = tl.zeros([GROUP_PAD, D], tl.float32)
                for sp in range(0, active):
                    lse_s = tl.load(LsePart + base_part + sp, mask=hmask, other=float("-inf"), cache_modifier=".cg")
                    o_s = tl.load(OPart + (base_part + sp)[:, None] * D + offs_d[None, :], mask=hmask[:, None],
                                  other=0.0, cache_modifier=".cg")
                    m_next = tl.maximum(m_all, lse_s)
                    m_safe = tl.where(m_next == float("-inf"), 0.0, m_next)
                    scale_old = tl.math.exp2(m_all - m_safe)
                    w = tl.math.exp2(lse_s - m_safe)
                    w_sum = w_sum * scale_old + w
                    o_all = o_all * scale_old[:, None] + w[:, None] * o_s
                    m_all = m_next
                o_all = o_all / tl.maximum(w_sum, 1e-30)[:, None]
                tl.store(O + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         o_all.to(O.dtype.element_ty), mask=hmask[:, None])
        else:
            tl.store(O + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     o.to(O.dtype.element_ty), mask=hmask[:, None])
    else:
        tl.store(O + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=hmask[:, None])


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed per-(sequence, KV head) counters; each launch leaves them at zero again."""
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _LOCKS[device] = buf
    return buf


MIN_KEYS_PER_SPLIT = 256


def default_num_splits(batch: int, kv_heads: int, max_seq_len: int, sm_count: int) -> int:
    """About one program per SM across the batch's (sequence, KV head) pairs, no split shorter
    than MIN_KEYS_PER_SPLIT keys (measured on an H100 by bench/attention.py)."""
    want = triton.cdiv(sm_count, max(batch * kv_heads, 1))
    most = max(triton.cdiv(max_seq_len, MIN_KEYS_PER_SPLIT), 1)
    return max(1, min(want, most, 64))


def default_tile(head_dim: int, num_splits: int, on_cpu: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_stages, num_warps), from bench/attention.py on an H100: at d 64, long unsplit
    ranges (big batches) and the many short splits of a small batch both stream best in 256-key
    tiles (the latter with 8 warps); otherwise 128-key tiles."""
    if on_cpu:
        return 16, 1, 4
    if head_dim <= 64 and num_splits == 1:
        return 256, 2, 4
    if head_dim <= 64 and num_splits >= 4:
        return 256, 2, 8
    return 128, 3, 4


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, slopes: torch.Tensor, scale: float | None = None, *,
                     k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                     new_slots: torch.Tensor | None = None, num_splits: int | None = None,
                     max_seq_len: int | None = None, out: torch.Tensor | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     min_keys_per_split: int = MIN_KEYS_PER_SPLIT, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, backend: str = "auto", pdl: bool = True) -> torch.Tensor:
    """q [B, Hq, D] at position seq_lens[b] - 1 of sequence b; keys 0..seq_lens[b]-1.

    Without k_new, every key must already be in the cache. With k_new/v_new [B, Hkv, D] and
    new_slots [B] (-1: don't write), the newest key of each sequence comes from them and the
    kernel also writes them to their cache slots (one launch instead of a KV write + attention).
    num_splits is fixed by the caller for CUDA-graph capture; otherwise it is chosen from the batch
    and max_seq_len (an upper bound of seq_lens; defaults to the block table's capacity). It is an
    upper bound: sequence b uses min(num_splits, ceil(seq_lens[b] / min_keys_per_split)) ranges.
    A sequence with seq_lens[b] == 0 (padding) gets a zero output. An FP8 cache (float8_e4m3fn)
    comes with k_scale, v_scale [Hkv] float32 (kernels/kv_cache.py); the new K/V are written quantized.
    """
    check_cache_pair(k_cache, v_cache, k_scale, v_scale)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"attention_decode: q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    batch, hq, dim = q.shape
    hkv, page = k_cache.shape[1], k_cache.shape[2]
    if block_table.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError("attention_decode: block_table and seq_lens need one row per sequence")
    has_new = k_new is not None
    if has_new and (v_new is None or new_slots is None or k_new.shape != (batch, hkv, dim)
                    or v_new.shape != k_new.shape or new_slots.shape != (batch,)):
        raise ValueError("attention_decode: k_new, v_new [B, Hkv, D] and new_slots [B] go together")
    slopes = check_slopes(slopes, hq, q.device)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if not use_triton(q, backend) or not is_power_of_two(dim):
        if has_new:
            write_kv_reference(k_new, v_new, k_cache, v_cache, new_slots, k_scale, v_scale)
        result = attention_decode_reference(q, k_cache, v_cache, block_table, seq_lens, slopes, scale, k_scale, v_scale,
                                            k_new, v_new)
        if out is None:
            return result
        out.copy_(result)
        return out
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if num_splits is None:
        cap = max_seq_len if max_seq_len is not None else block_table.shape[1] * page
        num_splits = default_num_splits(batch, hkv, cap, num_sms(q.device))
    tile_n, tile_stages, tile_warps = default_tile(dim, num_splits, not q.is_cuda)
    num_warps = num_warps or tile_warps
    block_n = block_n or tile_n
    num_stages = num_stages or tile_stages
    split = num_splits > 1
    if split:
        o_part = torch.empty(batch * hq * num_splits, dim, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(batch * hq * num_splits, dtype=torch.float32, device=q.device)
        locks = _locks(q.device, batch * hkv)
    else:
        o_part = lse_part = locks = out
    if has_new:
        if k_new.stride(2) != 1 or v_new.stride(2) != 1 or k_new.stride() != v_new.stride():
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
        new_args = (k_new, v_new, new_slots, k_new.stride(0), k_new.stride(1))
    else:
        new_args = (q, q, seq_lens, 0, 0)
    kn, vn, ns, stride_nb, stride_nh = new_args
    fp8 = is_fp8_cache(k_cache)
    _decode_kernel[(batch, hkv, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, slopes, out, o_part, lse_part, locks, kn, vn, ns,
        k_scale if fp8 else slopes, v_scale if fp8 else slopes, scale * LOG2E_HOST, num_splits,
        max(1, int(min_keys_per_split)),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0), stride_nb, stride_nh,
        GROUP=hq // hkv, GROUP_PAD=max(16, triton.next_power_of_2(hq // hkv)), D=dim, BLOCK_N=block_n, PAGE=page,
        SPLIT=split, HAS_NEW=has_new, DOT_PRECISION=dot_precision(q.dtype), KV_FP8=fp8, FP8_MAX=E4M3_MAX,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch_options(q, pdl))
    return out
