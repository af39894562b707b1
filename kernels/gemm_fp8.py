"""Matrix products with FP8 weights (W8A16) for prefill: out[M, N] = x[M, K] @ (W[N, K] * scale[N, None])^T.

W is float8_e4m3fn with one float32 scale per output row (fp8.py). Products of more
rows than the decode GEMV takes (kernels/gemv.py, M <= 16) came through a dequantized copy of W
made on every call; this kernel reads W in FP8 instead, half the bytes of bf16, and needs no copy.

Each program owns one BLOCK_M x BLOCK_N output tile and walks K: it loads a tile of x and an FP8
tile of W, converts the W tile to x's dtype (exact: every e4m3 value is a bf16, fp16 and fp32 value)
and accumulates the dot in float32. The row scale is constant along K, so it multiplies the sums
once in the epilogue rather than every W tile. Programs run in groups of GROUP_M row tiles that
sweep the column tiles together, so a W tile is read from HBM once per group and from L2 after.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import dot_precision
from .backend import use_triton

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def linear_fp8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same product in plain PyTorch: float32 sums, row scales applied to them, rounded to x's dtype."""
    return (torch.matmul(x.float(), weight.float().T) * scale.float()).to(x.dtype)


@triton.jit
def _gemm_fp8_kernel(X, W, Scale, Out, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # grouped program order: consecutive programs take GROUP_M row tiles of one column tile, then
    # the next column tile, so the W tiles a group shares stay in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # rows and columns past the edge read row/column 0 again instead of being masked (their results
    # are not stored), so only a ragged K needs load masks
    rows_in = tl.where(rows < M, rows, 0).to(tl.int64)
    cols_in = tl.where(cols < N, cols, 0).to(tl.int64)
    x_ptrs = X + rows_in[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = W + cols_in[:, None] * stride_wn + ks[None, :] * stride_wk

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            kmask = (k0 + ks) < K
            x = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    acc = acc * tl.load(Scale + cols, mask=cols < N, other=0.0)[None, :]
    out_ptrs = Out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def gemm_fp8_config(m: int, dtype: torch.dtype, on_cpu: bool) -> dict:
    """Tiles per row count: Hopper tiles on the GPU, small ones under the interpreter (it runs each
    program in numpy)."""
    if on_cpu:
        return dict(BLOCK_M=16 if m <= 16 else 32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if m <= 64:         # few rows: the product streams W, so more programs over N rather than wasted rows
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if dtype == torch.float32:      # x tiles twice the bytes: fewer stages fit in shared memory
        cfg["num_stages"] = 2
    return cfg


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"linear_fp8: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                         "(x [M, K], weight [N, K])")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"linear_fp8: x must be one of {ACT_DTYPES}, got {x.dtype}")
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"linear_fp8: the weight must be float8_e4m3fn, got {weight.dtype}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (weight.shape[0],):
        raise ValueError(f"linear_fp8: scale must be float32 [{weight.shape[0]}] (one per weight row), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if not (x.device == weight.device == scale.device):
        raise ValueError(f"linear_fp8: x, weight and scale must share a device, got {x.device}, {weight.device}, "
                         f"{scale.device}")
    if out is not None and (tuple(out.shape) != (x.shape[0], weight.shape[0]) or out.dtype != x.dtype
                            or out.device != x.device):
        raise ValueError(f"linear_fp8: out must be {x.dtype} [{x.shape[0]}, {weight.shape[0]}] on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, *,
               config: dict | None = None, backend: str = "auto") -> torch.Tensor:
    """x [M, K] (bfloat16, float16 or float32) times (weight [N, K] float8_e4m3fn * scale [N] float32
    per row)^T, float32 sums, result in x's dtype (written to `out` when given)."""
    _check(x, weight, scale, out)
    m, k = x.shape
    n = weight.shape[0]
    if not use_triton(x, backend):
        result = linear_fp8_reference(x, weight, scale)
        if out is None:
            return result
        out.copy_(result)
        return out
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = dict(config or gemm_fp8_config(m, x.dtype, not x.is_cuda))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_fp8_kernel[grid](x, weight, scale, out, m, n, k, x.stride(0), x.stride(1), weight.stride(0),
                           weight.stride(1), out.stride(0), out.stride(1), EVEN_K=k % cfg["BLOCK_K"] == 0,
                           DOT_PRECISION=dot_precision(x.dtype), **cfg)
    return out
