"""Self-attention of the flow estimator's transformer blocks (diffusers BasicTransformerBlock in the
U-Net of SPEC.md §3.3/§3.5), read straight from the fused q/k/v projection.

    qkv [N, L, 3 * H * D]   (q | k | v, heads contiguous inside each, as row_conv writes it)
    out[n, i, h*D:(h+1)*D] = softmax_j(q_i . k_j / sqrt(D), keys with key_mask[n, j] = 0 left out) v_j

Non-causal, no bias. One launch per call, output already in the [N, L, H * D] row layout the
out-projection reads: no q/k/v copies, no separate mask tensor, no workspace memset (SDPA spends
two to three kernels a call here, and the estimator makes 64 calls per Euler step). Launched with
programmatic dependent launch on Hopper (kernels/pdl.py), like the row_conv kernels around it.
Softmax in float32 (exp2, scale folded); P is rounded to the input dtype before P @ V, as
FlashAttention does.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .attention_common import LOG2E_HOST, dot_precision, softmax_update
from .backend import use_triton
from .pdl import pdl_launch_options


def flow_attention_reference(qkv: torch.Tensor, heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [N, L, 3 * H * D]; key_mask [N, L] (0 = padded key) or None -> [N, L, H * D]."""
    n, length, width = qkv.shape
    d = width // (3 * heads)
    q, k, v = qkv.view(n, length, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if key_mask is not None:
        bias = torch.zeros(n, 1, 1, length, dtype=qkv.dtype, device=qkv.device).masked_fill(
            key_mask[:, None, None, :] == 0, float("-inf"))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return o.transpose(1, 2).reshape(n, length, heads * d)


@triton.jit
def _flow_attention_kernel(QKV, KM, Out, L, sq_n, sq_l, so_n, so_l, sk_n, sk_l, qk_scale,
                           H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           USE_PDL: tl.constexpr):
    pid_m = tl.program_id(0)
    nh = tl.program_id(1)
    n = (nh // H).to(tl.int64)
    h = nh % H
    if USE_PDL:                      # kernels/pdl.py: wait for the projection that wrote qkv
        gdc_wait()
        gdc_launch_dependents()
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    base = QKV + n * sq_n
    q = tl.load(base + rows[:, None] * sq_l + (h * D + dd)[None, :], mask=(rows < L)[:, None] & d_ok[None, :],
                other=0.0)
    k_col = H * D + h * D + dd
    v_col = 2 * H * D + h * D + dd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_ok = keys < L
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(base + keys[:, None] * sq_l + k_col[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_MASK:
            km = tl.load(KM + n * sk_n + keys * sk_l, mask=k_ok, other=0.0)
            k_ok = k_ok & (km != 0)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        v = tl.load(base + keys[:, None] * sq_l + v_col[None, :], mask=kv_mask, other=0.0)
        acc, l_i, m_i = softmax_update(acc, l_i, m_i, s, v, True, DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(Out + n * so_n + rows[:, None] * so_l + (h * D + dd)[None, :], out.to(Out.dtype.element_ty),
             mask=(rows < L)[:, None] & d_ok[None, :])


# [(max length, (BLOCK_M, BLOCK_N, num_warps)), ...] ascending; None = any length. 64 x 64 tiles
# won at 2 x 176 and 2 x 352 frames against 16/32-row query tiles and 32/128-key blocks (H200,
# `bench/vocoder.py --sections tune_short`, 2026-12-04: 4.5 vs 5.0-7.4 us and 7.6 vs 8.4-13.9 us).
ATTENTION_TILES = [(None, (64, 64, 4))]


def attention_tile(length: int) -> tuple[int, int, int]:
    for max_len, tile in ATTENTION_TILES:
        if max_len is None or length <= max_len:
            return tile
    return ATTENTION_TILES[-1][1]


def flow_attention(qkv: torch.Tensor, heads: int, key_mask: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, *, tile: tuple | None = None, backend: str = "auto",
                   pdl: bool = True) -> torch.Tensor:
    """qkv [N, L, 3 * H * D] (last dim contiguous); key_mask [N, L] (any float/int dtype, 0 = padded
    key; None = every key valid). Returns [N, L, H * D] in qkv's dtype (into `out` when given).
    tile: (BLOCK_M, BLOCK_N, num_warps) instead of ATTENTION_TILES' choice (tests and tile sweeps)."""
    n, length, width = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"flow_attention: width {width} is not 3 x {heads} heads x head_dim")
    d = width // (3 * heads)
    if key_mask is not None:
        if key_mask.dim() == 3:
            key_mask = key_mask[:, 0]
        if key_mask.shape != (n, length):
            raise ValueError(f"flow_attention: key_mask must be [{n}, {length}], got {list(key_mask.shape)}")
    if out is not None and out.shape != (n, length, heads * d):
        raise ValueError(f"flow_attention: out must be [{n}, {length}, {heads * d}], got {list(out.shape)}")
    if not use_triton(qkv, backend):
        y = flow_attention_reference(qkv, heads, key_mask)
        return y if out is None else out.copy_(y)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if out is None:
        out = torch.empty(n, length, heads * d, dtype=qkv.dtype, device=qkv.device)
    elif out.stride(-1) != 1:
        raise ValueError("flow_attention: out must be contiguous along channels")
    km = key_mask if key_mask is not None else qkv
    block_m, block_n, warps = tile or attention_tile(length)
    grid = (triton.cdiv(length, block_m), n * heads)
    _flow_attention_kernel[grid](
        qkv, km, out, length, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        km.stride(0) if key_mask is not None else 0, km.stride(1) if key_mask is not None else 0,
        LOG2E_HOST / math.sqrt(d), H=heads, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        HAS_MASK=key_mask is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(qkv.dtype), num_warps=warps, num_stages=2,
        **pdl_launch_options(qkv, pdl))
    return out
