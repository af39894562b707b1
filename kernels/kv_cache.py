"""Paged KV cache layout and the write of new K/V rows into their page slots.

Layout of one layer's cache, for K and for V alike: [num_pages, num_kv_heads, page_size, head_dim]
(each head's page is one contiguous run of page_size * head_dim elements, so decode reads whole
runs). Slot s of the flat token space lives at page s // page_size, row s % page_size. A slot of -1
means "don't write" (padding in CUDA-graph batches).

An FP8 cache (float8_e4m3fn) holds x / scale per element, with one float32 scale per KV head of
the layer for K and one for V (`k_scale`, `v_scale` [kv_heads]); values beyond 448 * scale
saturate. Readers multiply the scale back in (the attention kernels fold it into their products).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import use_triton
from .fp8 import E4M3_MAX, FP8_DTYPE




def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_DTYPE


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> None:
    """The two caches agree; an FP8 pair comes with float32 scales of one per KV head."""
    if k_cache.dim() != 4:
        raise ValueError(f"KV cache must be [pages, kv_heads, page_size, head_dim], got {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must share shape, strides and dtype")
    if k_cache.stride(-1) != 1:
        raise ValueError("KV cache rows must be contiguous in head_dim")
    if is_fp8_cache(k_cache):
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None or scale.shape != (k_cache.shape[1],) or scale.dtype != torch.float32:
                raise ValueError(f"an FP8 KV cache needs {name} as float32 [{k_cache.shape[1]}] (one per KV head), "
                                 f"got {None if scale is None else (tuple(scale.shape), scale.dtype)}")
            if scale.device != k_cache.device:
                raise ValueError(f"{name} is on {scale.device}, the cache on {k_cache.device}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"KV scales go with an FP8 cache, not a {k_cache.dtype} one")


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, kv_heads, D] as FP8 cache rows: x / scale[head], saturated at the format's range (as the
    kernels compute it: times the float32 reciprocal of the scale)."""
    inverse = 1.0 / scale.float()
    return (x.float() * inverse[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, length: int,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first `length` positions of one sequence as [length, kv_heads, head_dim]; from an FP8
    cache, dequantized to float32 with its per-head `scale`."""
    page_size = cache.shape[2]
    num_pages = (length + page_size - 1) // page_size
    pages = cache[block_table_row[:num_pages].long()]          # [n, H, P, D]
    rows = pages.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])[:length]
    if is_fp8_cache(cache):
        return rows.float() * scale.float()[None, :, None]
    return rows


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    page_size = k_cache.shape[2]
    slots = slot_mapping.long()
    valid = slots >= 0
    slots = slots[valid]
    pages, rows = slots // page_size, slots % page_size
    if is_fp8_cache(k_cache):
        k_cache[pages, :, rows] = quantize_kv(k[valid], k_scale)
        v_cache[pages, :, rows] = quantize_kv(v[valid], v_scale)
        return
    k_cache[pages, :, rows] = k[valid].to(k_cache.dtype)
    v_cache[pages, :, rows] = v[valid].to(v_cache.dtype)


@triton.jit
def _e4m3_grid(x):
    """float32 x (within +-448) rounded to the nearest e4m3 value, ties to even. The cast that follows
    is then exact: the Triton interpreter's float8 cast does not carry a rounded-up mantissa into the
    exponent (31.5 -> 16), and with values already on the grid every cast agrees with torch's."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)  # 23 mantissa bits -> 3
    magnitude = tl.abs(x)
    small = (magnitude + 24576.0) - 24576.0                          # multiples of 2^-9 (1.5 * 2^14 has ulp 2^-9)
    subnormal = (small.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)  # sign kept
    return tl.where(magnitude < 0.015625, subnormal, normal)


@triton.jit
def cache_value(x, inv_scale, CacheT, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """x as the cache stores it: cast, or for an FP8 cache scaled by 1 / scale and saturated."""
    if FP8:
        x = _e4m3_grid(tl.clamp(x.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX))
    return x.to(CacheT.dtype.element_ty)


@triton.jit
def _write_kv_kernel(K, V, KC, VC, Slots, KScale, VScale, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cp, stride_ch, stride_cs,
                     H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
                     FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, D)
    mask = (heads[:, None] < H) & (slot >= 0)
    slot = tl.maximum(slot, 0)
    dst = (slot // PAGE) * stride_cp + heads[:, None] * stride_ch + (slot % PAGE) * stride_cs + dims[None, :]
    k_inv = 1.0
    v_inv = 1.0
    if FP8:
        k_inv = 1.0 / tl.load(KScale + heads, mask=heads < H, other=1.0)[:, None]
        v_inv = 1.0 / tl.load(VScale + heads, mask=heads < H, other=1.0)[:, None]
    k = tl.load(K + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(KC + dst, cache_value(k, k_inv, KC, FP8, FP8_MAX), mask=mask)
    v = tl.load(V + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(VC + dst, cache_value(v, v_inv, VC, FP8, FP8_MAX), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
             backend: str = "auto") -> None:
    """Copy k, v [T, kv_heads, head_dim] into the cache slots slot_mapping [T] (-1 skips); into an
    FP8 cache quantized with the per-head k_scale, v_scale [kv_heads]."""
    check_cache_pair(k_cache, v_cache, k_scale, v_scale)
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != (k_cache.shape[1], k_cache.shape[3]):
        raise ValueError(f"write_kv: k/v {tuple(k.shape)} do not fit cache {tuple(k_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError("write_kv: slot_mapping needs one slot per token")
    if k.shape[0] == 0:
        return
    if not use_triton(k, backend) or k.shape[2] & (k.shape[2] - 1):
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    heads, dim = k.shape[1], k.shape[2]
    fp8 = is_fp8_cache(k_cache)
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k_scale if fp8 else k, v_scale if fp8 else v,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=heads, D=dim, PAGE=k_cache.shape[2], BLOCK_H=triton.next_power_of_2(heads), FP8=fp8, FP8_MAX=E4M3_MAX,
        num_warps=1)
