"""SAN-M self-attention of the streaming Paraformer encoder, fused with its FSMN memory
(SPEC.md §4.3-4.4; FunASR MultiHeadedAttentionSANM.forward_chunk).

The encoder runs on windows of R rows (5 carried + up to 4 new LFR frames). Per window and head:
  ctx = softmax(q k^T / sqrt(dh)) v   over the window's valid rows plus up to L look-back rows
                                      (keys/values kept from earlier windows of the same stream)
  mem = v + depthwise_conv1d(v)       over the window's own rows only, zero-padded, kernel Kf
                                      (left pad (Kf-1)//2 + shift)
Look-back slots are right-aligned: the last `lb_len[w]` of the L slots are valid. Rows at or
past `n_rows[w]` are padding: they are not keys and count as zeros for the FSMN. The caller adds
`linear_out(ctx) + mem`. Arithmetic is float32 (IEEE dots); outputs take q's dtype.

The look-back K/V come either as tensors [W, L, D] (`sanm_attention`: a live stream's cache) or
as row indices into the batch's own k, v flattened to [W * R, D] (`sanm_attention_indexed`: the
offline batch, where window w's look-back rows are K/V of earlier windows of the same utterance);
the indexed kernel reads them in place instead of a gather writing copies first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import use_triton


def sanm_attention_reference(q, k, v, lb_k, lb_v, lb_len, n_rows, fsmn_weight, num_heads: int,
                             left_pad: int):
    w, r, d = q.shape
    lb = lb_k.shape[1]
    dh = d // num_heads
    dev = q.device
    slots = torch.arange(lb, device=dev)
    rows = torch.arange(r, device=dev)
    lb_ok = slots[None, :] >= (lb - lb_len.long())[:, None]                 # [W, L]
    row_ok = rows[None, :] < n_rows.long()[:, None]                          # [W, R]
    key_ok = torch.cat([lb_ok, row_ok], dim=1)                               # [W, L+R]

    def heads(t):
        return t.float().reshape(t.shape[0], t.shape[1], num_heads, dh).transpose(1, 2)

    qh = heads(q) * dh ** -0.5
    kh = heads(torch.cat([lb_k, k], dim=1))
    vh = heads(torch.cat([lb_v, v], dim=1))
    scores = (qh @ kh.transpose(-1, -2)).masked_fill(~key_ok[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(dim=-1) @ vh).transpose(1, 2).reshape(w, r, d)

    vm = v.float() * row_ok[..., None]
    kf = fsmn_weight.shape[-1]
    padded = torch.nn.functional.pad(vm.transpose(1, 2), (left_pad, kf - 1 - left_pad))
    conv = torch.nn.functional.conv1d(padded, fsmn_weight.float().reshape(d, 1, kf), groups=d)
    mem = conv.transpose(1, 2) + vm
    return ctx.to(q.dtype), mem.to(q.dtype)


def sanm_attention_indexed_reference(q, k, v, lb_index, lb_len, n_rows, fsmn_weight, num_heads: int,
                                     left_pad: int):
    d = k.shape[-1]
    lb_k, lb_v = k.reshape(-1, d)[lb_index], v.reshape(-1, d)[lb_index]
    return sanm_attention_reference(q, k, v, lb_k, lb_v, lb_len, n_rows, fsmn_weight, num_heads, left_pad)


@triton.jit
def _sanm_kernel(Q, K, V, LBK, LBV, LBIDX, LBLEN, NROWS, FW, Ctx, Mem,
                 sq_w, sq_r, sk_w, sk_r, sv_w, sv_r, slk_w, slk_r, slv_w, slv_r, so_w, so_r,
                 R, L, scale,
                 DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
                 KF: tl.constexpr, LEFT: tl.constexpr, INDEXED: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    rows = tl.arange(0, BLOCK_R)
    slots = tl.arange(0, BLOCK_L)
    dims = h * DH + tl.arange(0, DH)
    n_rows = tl.load(NROWS + w)
    lb_len = tl.load(LBLEN + w)
    row_in = rows < R
    row_ok = rows < n_rows
    lb_ok = (slots < L) & (slots >= L - lb_len)

    q = tl.load(Q + w * sq_w + rows[:, None] * sq_r + dims[None, :], mask=row_in[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    k = tl.load(K + w * sk_w + rows[:, None] * sk_r + dims[None, :], mask=row_ok[:, None], other=0.0)
    v = tl.load(V + w * sv_w + rows[:, None] * sv_r + dims[None, :], mask=row_ok[:, None], other=0.0)
    k = k.to(tl.float32)
    v = v.to(tl.float32)
    if INDEXED:
        # rows LBIDX[w, slot] of K, V flattened to [W * R, D] (row stride sk_r = sk_w / R)
        src = tl.load(LBIDX + w * L + slots, mask=slots < L, other=0).to(tl.int64)
        lk = tl.load(K + src[:, None] * sk_r + dims[None, :], mask=lb_ok[:, None], other=0.0)
        lv = tl.load(V + src[:, None] * sv_r + dims[None, :], mask=lb_ok[:, None], other=0.0)
    else:
        lk = tl.load(LBK + w * slk_w + slots[:, None] * slk_r + dims[None, :], mask=lb_ok[:, None], other=0.0)
        lv = tl.load(LBV + w * slv_w + slots[:, None] * slv_r + dims[None, :], mask=lb_ok[:, None], other=0.0)
    lk = lk.to(tl.float32)
    lv = lv.to(tl.float32)

    s_own = tl.dot(q, tl.trans(k), input_precision="ieee")
    s_own = tl.where(row_ok[None, :], s_own, float("-inf"))
    s_lb = tl.dot(q, tl.trans(lk), input_precision="ieee")
    s_lb = tl.where(lb_ok[None, :], s_lb, float("-inf"))
    m = tl.maximum(tl.max(s_own, axis=1), tl.max(s_lb, axis=1))
    p_own = tl.exp(s_own - m[:, None])
    p_lb = tl.exp(s_lb - m[:, None])
    denom = tl.sum(p_own, axis=1) + tl.sum(p_lb, axis=1)
    ctx = tl.dot(p_own, v, input_precision="ieee") + tl.dot(p_lb, lv, input_precision="ieee")
    ctx = ctx / denom[:, None]
    out_off = w * so_w + rows[:, None] * so_r + dims[None, :]
    tl.store(Ctx + out_off, ctx.to(Ctx.dtype.element_ty), mask=row_in[:, None])

    # FSMN: v + sum_j weight[c, j] * v[row + j - LEFT, c], zero outside the window's valid rows
    mem = v
    for j in tl.static_range(KF):
        src = rows + (j - LEFT)
        src_ok = (src >= 0) & (src < n_rows)
        vs = tl.load(V + w * sv_w + src[:, None] * sv_r + dims[None, :], mask=src_ok[:, None], other=0.0)
        wj = tl.load(FW + dims * KF + j)
        mem += vs.to(tl.float32) * wj.to(tl.float32)[None, :]
    tl.store(Mem + out_off, mem.to(Mem.dtype.element_ty), mask=row_in[:, None])


def _sanm_triton(q, k, v, lb_k, lb_v, lb_len, n_rows, fsmn_weight, num_heads, left_pad, lb_index=None):
    w, r, d = q.shape
    lb = lb_index.shape[1] if lb_index is not None else lb_k.shape[1]
    dh = d // num_heads
    if dh & (dh - 1) or dh < 16:
        raise ValueError(f"sanm_attention (triton): head dim {dh} must be a power of two >= 16")
    for t in (q, k, v) + ((lb_k, lb_v) if lb_index is None else ()):
        if t.stride(-1) != 1:
            raise ValueError("sanm_attention: tensors must be contiguous in the feature dim")
    ctx = torch.empty(w, r, d, dtype=q.dtype, device=q.device)
    mem = torch.empty_like(ctx)
    fw = fsmn_weight.reshape(d, -1).contiguous()
    kf = fw.shape[1]
    if lb_index is not None:
        lb_k = lb_v = k                               # unused pointers
        lb_index = lb_index.contiguous()
    _sanm_kernel[(w, num_heads)](
        q, k, v, lb_k, lb_v, lb_index if lb_index is not None else lb_len, lb_len.to(torch.int32),
        n_rows.to(torch.int32), fw, ctx, mem,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        lb_k.stride(0), lb_k.stride(1), lb_v.stride(0), lb_v.stride(1), ctx.stride(0), ctx.stride(1),
        r, lb, dh ** -0.5,
        DH=dh, BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_L=max(16, triton.next_power_of_2(lb)),
        KF=kf, LEFT=left_pad, INDEXED=lb_index is not None, num_warps=4)
    return ctx, mem


def _check(q, k, v, num_heads):
    if not (q.shape == k.shape == v.shape):
        raise ValueError("sanm_attention: q, k, v must be [W, R, D]")
    if q.shape[-1] % num_heads:
        raise ValueError(f"sanm_attention: width {q.shape[-1]} is not divisible by {num_heads} heads")


def sanm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lb_k: torch.Tensor,
                   lb_v: torch.Tensor, lb_len: torch.Tensor, n_rows: torch.Tensor,
                   fsmn_weight: torch.Tensor, num_heads: int, left_pad: int, *, backend: str = "auto"):
    """q, k, v [W, R, D] (views of one packed qkv are fine), lb_k, lb_v [W, L, D], lb_len and
    n_rows int [W], fsmn_weight [D, Kf] or [D, 1, Kf]. Returns (ctx, mem), both [W, R, D]."""
    _check(q, k, v, num_heads)
    if not (lb_k.shape == lb_v.shape and q.shape[0] == lb_k.shape[0]):
        raise ValueError("sanm_attention: lb_k, lb_v must be [W, L, D]")
    if use_triton(q, backend):
        return _sanm_triton(q, k, v, lb_k, lb_v, lb_len, n_rows, fsmn_weight, num_heads, left_pad)
    return sanm_attention_reference(q, k, v, lb_k, lb_v, lb_len, n_rows, fsmn_weight, num_heads, left_pad)


def sanm_attention_indexed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lb_index: torch.Tensor,
                           lb_len: torch.Tensor, n_rows: torch.Tensor, fsmn_weight: torch.Tensor,
                           num_heads: int, left_pad: int, *, backend: str = "auto"):
    """As `sanm_attention`, with look-back slot m of window w holding row lb_index[w, m] (int64
    [W, L]) of k, v flattened to [W * R, D] (the same K/V values: identical results)."""
    _check(q, k, v, num_heads)
    if lb_index.dim() != 2 or lb_index.shape[0] != q.shape[0]:
        raise ValueError("sanm_attention_indexed: lb_index must be [W, L]")
    r = q.shape[1]
    flat = k.stride(0) == r * k.stride(1) and v.stride(0) == r * v.stride(1)
    if use_triton(q, backend) and flat:
        return _sanm_triton(q, k, v, None, None, lb_len, n_rows, fsmn_weight, num_heads, left_pad, lb_index)
    if use_triton(q, backend):
        d = k.shape[-1]
        return sanm_attention(q, k, v, k.reshape(-1, d)[lb_index], v.reshape(-1, d)[lb_index], lb_len, n_rows,
                              fsmn_weight, num_heads, left_pad, backend=backend)
    return sanm_attention_indexed_reference(q, k, v, lb_index, lb_len, n_rows, fsmn_weight, num_heads, left_pad)
