"""Paged KV cache layout and the write of new K/V rows into their page slots.

Layout of one layer's cache, for K and for V alike: [num_pages, num_kv_heads, page_size, head_dim]
(each head's page is one contiguous run of page_size * head_dim elements, so decode reads whole
runs). Slot s of the flat token space lives at page s // page_size, row s % page_size. A slot of -1
means "don't write" (padding in CUDA-graph batches).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import use_triton


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"KV cache must be [pages, kv_heads, page_size, head_dim], got {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache must share shape, strides and dtype")
    if k_cache.stride(-1) != 1:
        raise ValueError("KV cache rows must be contiguous in head_dim")


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` positions of one sequence as [length, kv_heads, head_dim]."""
    page_size = cache.shape[2]
    num_pages = (length + page_size - 1) // page_size
    pages = cache[block_table_row[:num_pages].long()]          # [n, H, P, D]
    return pages.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])[:length]


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping):
    page_size = k_cache.shape[2]
    slots = slot_mapping.long()
    valid = slots >= 0
    slots = slots[valid]
    pages, rows = slots // page_size, slots % page_size
    k_cache[pages, :, rows] = k[valid].to(k_cache.dtype)
    v_cache[pages, :, rows] = v[valid].to(v_cache.dtype)


@triton.jit
def _write_kv_kernel(K, V, KC, VC, Slots, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cp, stride_ch, stride_cs,
                     H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, D)
    mask = (heads[:, None] < H) & (slot >= 0)
    slot = tl.maximum(slot, 0)
    dst = (slot // PAGE) * stride_cp + heads[:, None] * stride_ch + (slot % PAGE) * stride_cs + dims[None, :]
    k = tl.load(K + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    tl.store(KC + dst, k.to(KC.dtype.element_ty), mask=mask)
    v = tl.load(V + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(VC + dst, v.to(VC.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: str = "auto") -> None:
    """Copy k, v [T, kv_heads, head_dim] into the cache slots slot_mapping [T] (-1 skips)."""
    check_cache_pair(k_cache, v_cache)
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != (k_cache.shape[1], k_cache.shape[3]):
        raise ValueError(f"write_kv: k/v {tuple(k.shape)} do not fit cache {tuple(k_cache.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError("write_kv: slot_mapping needs one slot per token")
    if k.shape[0] == 0:
        return
    if not use_triton(k, backend) or k.shape[2] & (k.shape[2] - 1):
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    heads, dim = k.shape[1], k.shape[2]
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=heads, D=dim, PAGE=k_cache.shape[2], BLOCK_H=triton.next_power_of_2(heads), num_warps=1)
