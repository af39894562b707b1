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
projection's input load, both measured slower on an H100; see bench/RESULTS.md.)
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


def linear_small_m_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(X, W, Out, Work, Counters, M, N, K, stride_xm, stride_wn, stride_om, k_range,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
                 SPLIT: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    k_begin = tl.program_id(1) * k_range
    k_end = tl.minimum(k_begin + k_range, K)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, M_PAD)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < N
    mmask = ms < M
    w_base = W + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    x_base = X + ms[:, None] * stride_xm + cols[None, :]
    # the first weight tile does not depend on any earlier kernel: ask for it before waiting
    if EVEN_K:
        w = tl.load(w_base + k_begin, mask=rmask[:, None], other=0.0)
    else:
        kmask = (k_begin + cols) < k_end
        w = tl.load(w_base + k_begin, mask=rmask[:, None] & kmask[None, :], other=0.0)
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    if EVEN_K:
        x = tl.load(x_base + k_begin, mask=mmask[:, None], other=0.0)
    else:
        x = tl.load(x_base + k_begin, mask=mmask[:, None] & kmask[None, :], other=0.0)
    acc = tl.dot(x, tl.trans(w), tl.zeros([M_PAD, BLOCK_N], tl.float32))
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_base + k0, mask=rmask[:, None], other=0.0)
            x = tl.load(x_base + k0, mask=mmask[:, None], other=0.0)
        else:
            kmask = (k0 + cols) < k_end
            w = tl.load(w_base + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(x_base + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    omask = mmask[:, None] & rmask[None, :]
    out_ptrs = Out + ms[:, None] * stride_om + rows[None, :]
    if SPLIT:
        slot = Work + ms[:, None] * N + rows[None, :]          # slot s of Work: [s * M * N, (s + 1) * M * N)
        tl.store(slot + tl.program_id(1) * M * N, acc, mask=omask)
        tl.debug_barrier()
        done = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(1) - 1:
            total = tl.zeros([M_PAD, BLOCK_N], tl.float32)
            for s in range(tl.num_programs(1)):
                total += tl.load(slot + s * M * N, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(Out.dtype.element_ty), mask=omask)
            tl.atomic_xchg(Counters + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=omask)


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


def gemv_config(n: int, k: int, sm_count: int = 132) -> dict:
    """Tile and K split per weight shape (bench/gemv.py on an H100, weights streamed from HBM,
    products back to back as in a decode step)."""
    if n > 8192:                            # fused gate|up and the LM head fill the GPU already
        return dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=3 if n < 32768 else 5)
    cfg = dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=5)
    blocks = triton.cdiv(n, cfg["BLOCK_N"])
    if k >= 8192 and blocks < sm_count:
        # down_proj (K = 8192, ~100 row blocks): six K ranges beat one (18.8 vs 20.4 us); for
        # qkv and o_proj (K = 3072) the merge costs more than the extra programs bring
        cfg.update(SPLIT_K=min(k // (4 * cfg["BLOCK_K"]), triton.cdiv(4 * sm_count, blocks)), num_stages=3)
    return cfg


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) times weight [N, K]^T, float32 accumulation, output in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"linear_small_m: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if m > MAX_M or not use_triton(x):
        return linear_small_m_reference(x, weight)
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = dict(config or gemv_config(n, k, num_sms(x.device)))
    block_n, block_k = cfg.pop("BLOCK_N"), cfg["BLOCK_K"]
    blocks = triton.cdiv(n, block_n)
    split = cfg.pop("SPLIT_K", 1)
    # each K range is a whole number of tiles, and none is empty
    k_range = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_range)
    if split * m * n > WORKSPACE_ELEMENTS or blocks > MAX_ROW_BLOCKS:
        split, k_range = 1, k
    work, counters = _workspace(x.device) if split > 1 else (out, out)
    _gemv_kernel[(blocks, split)](
        x, weight, out, work, counters, m, n, k, x.stride(0), weight.stride(0), out.stride(0), k_range,
        BLOCK_N=block_n, M_PAD=16, SPLIT=split > 1, EVEN_K=k % block_k == 0, **cfg,
        **pdl_launch_options(x))
    return out
