"""Row-wise argmax of a logits matrix in one launch (the greedy token of a decode step).

torch's argmax runs a whole 74752-wide row in one thread block (~18 us on an H100 for a batch of
one, plus a cast of bf16 logits to float32 before it). Here each program scans CHUNK columns of a
row and leaves its (max, index); the last program of the row to finish (an atomic counter tells)
merges the chunks in column order, so ties go to the lowest index as with torch.argmax. Values
are compared as float32 whatever the input dtype; NaN entries are skipped (torch would return them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import use_triton

CHUNK = 4096
MAX_PARTIALS = 64 * 64          # rows x chunks held by the scratch buffers


def argmax_rows_reference(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().argmax(-1)


@triton.jit
def _argmax_kernel(X, Out, PartVal, PartIdx, Counters, V, stride_x,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    best_v = float("-inf")
    best_i = chunk * CHUNK
    for c0 in tl.static_range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + c0 + tl.arange(0, BLOCK)
        v = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        v = tl.where(v != v, float("-inf"), v)                 # NaN never wins
        m = tl.max(v, axis=0)
        i = tl.min(tl.where(v == m, cols, 2147483647), axis=0)  # first column holding the max
        take = m > best_v                                       # strictly: earlier blocks win ties
        best_i = tl.where(take, i, best_i)
        best_v = tl.where(take, m, best_v)
    slot = row * chunks + chunk
    tl.store(PartVal + slot, best_v)
    tl.store(PartIdx + slot, best_i)
    tl.debug_barrier()
    done = tl.atomic_add(Counters + row, 1, sem="acq_rel", scope="gpu")
    if done == chunks - 1:
        tl.atomic_xchg(Counters + row, 0, sem="relaxed", scope="gpu")     # ready for the next launch
        ks = tl.arange(0, 64)
        vals = tl.load(PartVal + row * chunks + ks, mask=ks < chunks, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(PartIdx + row * chunks + ks, mask=ks < chunks, other=2147483647, cache_modifier=".cg")
        m = tl.max(vals, axis=0)
        tl.store(Out + row, tl.min(tl.where(vals == m, idxs, 2147483647), axis=0).to(tl.int64))


_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _scratch(device: torch.device):
    """Partials and zeroed counters, allocated once per device (CUDA graphs keep the addresses)."""
    buf = _SCRATCH.get(device)
    if buf is None:
        buf = (torch.empty(MAX_PARTIALS, dtype=torch.float32, device=device),
               torch.empty(MAX_PARTIALS, dtype=torch.int32, device=device),
               torch.zeros(64, dtype=torch.int32, device=device))
        _SCRATCH[device] = buf
    return buf


def argmax_rows(logits: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """logits [M, V] (any float dtype) -> int64 [M], the first index of each row's maximum."""
    if logits.dim() != 2:
        raise ValueError(f"argmax_rows: expected [rows, vocab], got {tuple(logits.shape)}")
    m, v = logits.shape
    chunks = triton.cdiv(v, CHUNK)
    if not use_triton(logits, backend) or m == 0 or m > 64 or chunks > 64 or m * chunks > MAX_PARTIALS:
        return argmax_rows_reference(logits)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(m, dtype=torch.int64, device=logits.device)
    part_val, part_idx, counters = _scratch(logits.device)
    _argmax_kernel[(m, chunks)](logits, out, part_val, part_idx, counters, v, logits.stride(0),
                                CHUNK=CHUNK, BLOCK=1024, num_warps=4)
    return out
