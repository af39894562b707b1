"""Nearest codebook entry by Euclidean distance (both audio tokenizers' quantisers).

argmin_k ||x - e_k||^2 = argmin_k (||e_k||^2 - 2 x.e_k): the row norm of x does not change the
winner, so it is never computed. Ties go to the lowest index, as torch.argmin does. The
[rows, codebook] distance matrix is never written out.

Two Triton implementations with the same result:

exhaustive  every score in IEEE float32 (FMA units): a sequential fma chain over the feature dim
            per (row, code), then ||e||^2 - 2 acc. Slow (no tensor cores) but it defines the codes.
screened    (default) 1. `_screen`: tensor-core (TF32) scores of every (row, code), tiled over
            (row block, codebook split). TF32 keeps 10 mantissa bits, so each approximate score
            lies within a proven bound m_k = rel * ||x|| * ||e_k|| + abs * ||e_k||^2 of the exact
            float32 score (rel covers operand rounding 2^-9 plus fp32 accumulation on both sides,
            2 * D * 2^-23, plus the rounding of ||e||^2 - 2 acc). Code k can only be the exact
            winner if its lower bound (approx - m_k) is <= min_j (approx_j + m_j); per split the
            kernel keeps up to SLOTS such candidates with their lower bounds.
            2. `_rescore`: per row, the global upper bound U = min over splits; the candidates
            with lower bound <= U (read in chunks of 16 slots, chunks without one skipped) are
            re-scored with the exhaustive kernel's arithmetic (the same IEEE fma chain, same
            feature blocking) and the lowest-index minimum wins. A split
            whose candidates overflowed its SLOTS (only possible with near-duplicate codes) is
            re-scored whole. The exact winner, and every code tied with it, is always among the
            re-scored codes, so the result equals the exhaustive kernel's.
Under the Triton interpreter (CPU tests) the TF32 operand rounding is emulated by truncating the
low 13 mantissa bits, so the screen is as coarse there as on a GPU. `method="exhaustive"` selects
the exhaustive kernel (A/B checks). Neither kernel uses tl.cumsum (see `_screen_kernel`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import use_triton

SCREEN_BLOCK_N = 64       # rows per screening program
SCREEN_BLOCK_K = 128      # codes per codebook split (one tile)
SCREEN_BLOCK_D = 32
SLOTS = 8                 # candidates kept per (row, split)
RESCORE_CHUNK = 16        # codes re-scored together
EXACT_BLOCK_D = 64        # feature block of the IEEE fma chain (exhaustive and re-score alike)

METHODS = ("screened", "exhaustive")


def nearest_centroid_reference(x: torch.Tensor, codebook: torch.Tensor,
                               codebook_sqnorm: torch.Tensor | None = None) -> torch.Tensor:
    x = x.float()
    e = codebook.float()
    if codebook_sqnorm is None:
        codebook_sqnorm = e.pow(2).sum(-1)
    scores = codebook_sqnorm[None, :] - 2.0 * (x @ e.T)
    return scores.argmin(dim=-1)


def screen_error_bounds(d: int) -> tuple[float, float]:
    """(rel, abs) of the screen's score bound |approx - exact| <= rel ||x|| ||e|| + abs ||e||^2
    for feature width d (see the module docstring)."""
    c = 2.0 ** -9 + 2.0 ** -19 + 2.0 * d * 2.0 ** -23     # |tf32 dot - ieee dot| / (||x|| ||e||)
    return 2.0 * c + 2.0 ** -21, 2.0 ** -21


# ---------------------------------------------------------------------------------- exhaustive
@triton.jit
def _rows_tile(P, idx, idx_ok, stride, dims, d_ok):
    """float32 tile [len(idx), len(dims)] of the row-major matrix P, zero outside the masks."""
    return tl.load(P + idx[:, None].to(tl.int64) * stride + dims[None, :],
                   mask=idx_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _nearest_centroid_kernel(X, E, SQ, Out, N, K, D, stride_x, stride_e,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            d_ok = dims < D
            x = _rows_tile(X, rows, row_ok, stride_x, dims, d_ok)
            e = _rows_tile(E, cols, col_ok, stride_e, dims, d_ok)
            acc += tl.dot(x, tl.trans(e), input_precision="ieee")
        sq = tl.load(SQ + cols, mask=col_ok, other=float("inf"))
        score = sq[None, :] - 2.0 * acc
        score = tl.where(col_ok[None, :], score, float("inf"))
        tile_best = tl.min(score, axis=1)
        tile_idx = tl.argmin(score, axis=1, tie_break_left=True) + k0
        better = tile_best < best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    tl.store(Out + rows, best_idx.to(tl.int64), mask=row_ok)


def nearest_centroid_exhaustive(x: torch.Tensor, codebook: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """Every score in IEEE float32 (the definition the screened search reproduces). Triton only."""
    n, d = x.shape
    k = codebook.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    codebook = codebook if codebook.stride(-1) == 1 else codebook.contiguous()
    out = torch.empty(n, dtype=torch.long, device=x.device)
    if n == 0:
        return out
    block_n, block_k = 32, 64
    _nearest_centroid_kernel[(triton.cdiv(n, block_n),)](
        x, codebook, sqnorm.float().contiguous(), out, n, k, d, x.stride(0), codebook.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=EXACT_BLOCK_D, num_warps=4)
    return out


# ---------------------------------------------------------------------------------- screened
@triton.jit
def _tf32_truncate(v):
    # keep sign, exponent and the top 10 mantissa bits: a TF32 operand as the tensor cores read it
    return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _screen_kernel(X, E, SQ, CandIdx, CandLow, Count, SplitUpper, SplitLower,
                   N, K, D, stride_x, stride_e, rel_err, abs_err,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   SLOTS: tl.constexpr, EMULATE_TF32: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = split * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    xsq = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        x = _rows_tile(X, rows, row_ok, stride_x, dims, d_ok)
        e = _rows_tile(E, cols, col_ok, stride_e, dims, d_ok)
        xsq += tl.sum(x * x, axis=1)
        if EMULATE_TF32:
            x = _tf32_truncate(x)
            e = _tf32_truncate(e)
        acc = tl.dot(x, tl.trans(e), acc, input_precision="tf32")
    sq = tl.load(SQ + cols, mask=col_ok, other=0.0)
    approx = sq[None, :] - 2.0 * acc
    margin = rel_err * tl.sqrt(xsq)[:, None] * tl.sqrt(sq)[None, :] + abs_err * sq[None, :]
    upper = tl.where(col_ok[None, :], approx + margin, float("inf"))
    lower = tl.where(col_ok[None, :], approx - margin, float("inf"))
    split_upper = tl.min(upper, axis=1)
    split_lower = tl.min(lower, axis=1)
    cand = (lower <= split_upper[:, None]) & col_ok[None, :]
    count = tl.sum(cand.to(tl.int32), axis=1)
    # slot of each candidate = candidates before it in its row: a product with a triangular 0/1
    # matrix (exact; no scan, whose lowering is layout-sensitive)
    kk = tl.arange(0, BLOCK_K)
    tri = (kk[:, None] <= kk[None, :]).to(tl.float16)
    pos = tl.dot(cand.to(tl.float16), tri, out_dtype=tl.float32).to(tl.int32) - 1
    rows64 = rows.to(tl.int64)
    slot = (rows64 * n_splits + split)[:, None] * SLOTS + pos
    keep = cand & (pos < SLOTS) & row_ok[:, None]
    tl.store(CandIdx + slot, cols[None, :] + tl.zeros((BLOCK_N, BLOCK_K), tl.int32), mask=keep)
    tl.store(CandLow + slot, lower, mask=keep)
    at = rows64 * n_splits + split
    tl.store(Count + at, count, mask=row_ok)
    tl.store(SplitUpper + at, split_upper, mask=row_ok)
    tl.store(SplitLower + at, split_lower, mask=row_ok)


@triton.jit
def _exact_scores(X, E, SQ, row, cidx, cok, D, stride_x, stride_e,
                  CH: tl.constexpr, BLOCK_D: tl.constexpr):
    """IEEE float32 scores of codes `cidx` for one row: the exhaustive kernel's fma chain (the
    row is broadcast to 16 dot rows, which all come out equal)."""
    bcast = tl.zeros((16,), tl.int64)
    acc = tl.zeros((16, CH), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        x = tl.load(X + row * stride_x + bcast[:, None] + dims[None, :],
                    mask=(bcast[:, None] == 0) & d_ok[None, :], other=0.0).to(tl.float32)
        e = tl.load(E + cidx[:, None].to(tl.int64) * stride_e + dims[None, :],
                    mask=cok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(e), input_precision="ieee")
    dot = tl.max(acc, axis=0)
    sq = tl.load(SQ + cidx, mask=cok, other=0.0)
    return tl.where(cok, sq - 2.0 * dot, float("inf"))


@triton.jit
def _keep_best(score, cidx, ok, best, best_idx):
    better = ok & ((score < best) | ((score == best) & (cidx < best_idx)))
    return tl.where(better, score, best), tl.where(better, cidx, best_idx)


@triton.jit
def _rescore_kernel(X, E, SQ, CandIdx, CandLow, Count, SplitUpper, SplitLower, Out,
                    K, D, S, stride_x, stride_e,
                    SLOTS: tl.constexpr, S_BLOCK: tl.constexpr, SPLIT_K: tl.constexpr,
                    CH: tl.constexpr, N_CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sid = tl.arange(0, S_BLOCK)
    s_ok = sid < S
    upper = tl.min(tl.load(SplitUpper + row * S + sid, mask=s_ok, other=float("inf")), axis=0)
    n_slots = S * SLOTS
    lane = tl.arange(0, CH)
    # which chunks of CH stored slots hold a candidate whose lower bound is within the global upper bound
    chunk = tl.arange(0, N_CHUNKS)
    j2 = chunk[:, None] * CH + lane[None, :]
    j2_ok = j2 < n_slots
    cnt2 = tl.load(Count + row * S + j2 // SLOTS, mask=j2_ok, other=0)
    low2 = tl.load(CandLow + row * n_slots + j2, mask=j2_ok, other=float("inf"))
    live = tl.max((j2_ok & ((j2 % SLOTS) < cnt2) & (low2 <= upper)).to(tl.int32), axis=1)
    best = tl.full((CH,), float("inf"), tl.float32)
    best_idx = tl.full((CH,), 2147483647, tl.int32)
    for c in range(0, N_CHUNKS):
        if tl.sum(tl.where(chunk == c, live, 0), axis=0) > 0:
            j = c * CH + lane
            j_ok = j < n_slots
            cnt = tl.load(Count + row * S + j // SLOTS, mask=j_ok, other=0)
            low = tl.load(CandLow + row * n_slots + j, mask=j_ok, other=float("inf"))
            ok = j_ok & ((j % SLOTS) < cnt) & (low <= upper)
            cidx = tl.load(CandIdx + row * n_slots + j, mask=ok, other=0)
            cidx = tl.minimum(tl.maximum(cidx, 0), K - 1)
            score = _exact_scores(X, E, SQ, row, cidx, ok, D, stride_x, stride_e, CH, BLOCK_D)
            best, best_idx = _keep_best(score, cidx, ok, best, best_idx)
    # splits with more candidates than slots: re-score the whole split
    cnt_s = tl.load(Count + row * S + sid, mask=s_ok, other=0)
    low_s = tl.load(SplitLower + row * S + sid, mask=s_ok, other=float("inf"))
    need = (s_ok & (cnt_s > SLOTS) & (low_s <= upper)).to(tl.int32)
    if tl.sum(need, axis=0) > 0:
        for s in range(0, S):
            if tl.sum(tl.where(sid == s, need, 0), axis=0) > 0:
                for c0 in range(s * SPLIT_K, s * SPLIT_K + SPLIT_K, CH):
                    cidx = c0 + lane
                    cok = cidx < K
                    score = _exact_scores(X, E, SQ, row, cidx, cok, D, stride_x, stride_e, CH, BLOCK_D)
                    best, best_idx = _keep_best(score, cidx, cok, best, best_idx)
    b = tl.min(best, axis=0)
    winner = tl.min(tl.where(best == b, best_idx, 2147483647), axis=0)
    winner = tl.where(winner == 2147483647, 0, winner)      # only if every score is NaN
    tl.store(Out + row, winner.to(tl.int64))


def nearest_centroid_screened(x: torch.Tensor, codebook: torch.Tensor, sqnorm: torch.Tensor,
                              slots: int = SLOTS) -> torch.Tensor:
    """Tensor-core screen + exact re-score (module docstring). Triton only; graph-capturable."""
    n, d = x.shape
    k = codebook.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    codebook = codebook if codebook.stride(-1) == 1 else codebook.contiguous()
    sqnorm = sqnorm.float().contiguous()
    out = torch.empty(n, dtype=torch.long, device=x.device)
    if n == 0:
        return out
    s = triton.cdiv(k, SCREEN_BLOCK_K)
    dev = x.device
    cand_idx = torch.empty(n, s, slots, dtype=torch.int32, device=dev)
    cand_low = torch.empty(n, s, slots, dtype=torch.float32, device=dev)
    count = torch.empty(n, s, dtype=torch.int32, device=dev)
    split_upper = torch.empty(n, s, dtype=torch.float32, device=dev)
    split_lower = torch.empty(n, s, dtype=torch.float32, device=dev)
    rel_err, abs_err = screen_error_bounds(d)
    _screen_kernel[(triton.cdiv(n, SCREEN_BLOCK_N), s)](
        x, codebook, sqnorm, cand_idx, cand_low, count, split_upper, split_lower,
        n, k, d, x.stride(0), codebook.stride(0), rel_err, abs_err,
        BLOCK_N=SCREEN_BLOCK_N, BLOCK_K=SCREEN_BLOCK_K, BLOCK_D=SCREEN_BLOCK_D, SLOTS=slots,
        EMULATE_TF32=not x.is_cuda, num_warps=8, num_stages=3)
    _rescore_kernel[(n,)](
        x, codebook, sqnorm, cand_idx, cand_low, count, split_upper, split_lower, out,
        k, d, s, x.stride(0), codebook.stride(0),
        SLOTS=slots, S_BLOCK=triton.next_power_of_2(s), SPLIT_K=SCREEN_BLOCK_K, CH=RESCORE_CHUNK,
        N_CHUNKS=triton.next_power_of_2(triton.cdiv(s * slots, RESCORE_CHUNK)), BLOCK_D=EXACT_BLOCK_D, num_warps=2)
    return out


def nearest_centroid(x: torch.Tensor, codebook: torch.Tensor, codebook_sqnorm: torch.Tensor | None = None, *,
                     method: str = "screened", backend: str = "auto") -> torch.Tensor:
    """Index of the nearest row of `codebook` [K, D] for each row of `x` [N, D] (int64 [N]). `method`
    picks the Triton implementation (both give the same codes; see the module doc)."""
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_centroid: x {tuple(x.shape)} and codebook {tuple(codebook.shape)} "
                         "must be [N, D] and [K, D]")
    if method not in METHODS:
        raise ValueError(f"nearest_centroid: method must be one of {METHODS}, got {method!r}")
    if codebook_sqnorm is None:
        codebook_sqnorm = codebook.float().pow(2).sum(-1)
    if not use_triton(x, backend):
        return nearest_centroid_reference(x, codebook, codebook_sqnorm)
    if method == "exhaustive":
        return nearest_centroid_exhaustive(x, codebook, codebook_sqnorm)
    return nearest_centroid_screened(x, codebook, codebook_sqnorm)
