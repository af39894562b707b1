"""The FP8-weight GEMM of prefill-sized products (kernels/gemm_fp8.py) under the Triton interpreter:
ragged shapes against float64 products of the dequantized weight, `out=`, the argument checks, and
`Matmul` sending FP8 products above the GEMV's rows to it; on a GPU, a prefill shape in bf16."""
import pytest
import torch
import torch.nn.functional as F

import stepvox.engine.layers.linear as linear_module
from stepvox.kernels.fp8 import dequantize_rows, quantize_rows
from stepvox.engine.layers.linear import Matmul
from stepvox.kernels import KernelConfig, linear_fp8, linear_fp8_reference

SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


def fp8_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 row scales, the float64 weight they stand for) of a random weight whose
    rows differ in magnitude (so the row scales matter)."""
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3 / k ** 0.5
    q, scale = quantize_rows(w)
    return q, scale, q.double() * scale.double()[:, None]


def tol(dtype: torch.dtype) -> float:
    # the weight is exact in every activation dtype and the sums are float32, so the error is float32
    # summation (~K * 2^-24 relative, K <= 300 here) plus the result's rounding to the dtype: 2^-11
    # relative for fp16 (4e-3 leaves room); relative to the largest output, as rows near 0 cancel
    return 2e-5 if dtype == torch.float32 else 4e-3


def close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.allclose(out.double(), want, rtol=tol(dtype), atol=tol(dtype) * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (17, 70, 96), (70, 33, 200), (32, 64, 300)])
def test_linear_fp8_matches_the_dequantized_float64_product(dtype, m, n, k):
    """M, N and K off the tiles (16 x 32 x 32, groups of two row tiles), and the default CPU tiles;
    the same product twice is identical."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q, scale, w64 = fp8_weight(n, k, gen)
    want = x.double() @ w64.T
    for config in (SMALL, None):
        out = linear_fp8(x, q, scale, config=config, backend="triton")
        assert out.dtype == dtype and out.shape == (m, n)
        assert close(out, want, dtype), config
        assert torch.equal(linear_fp8(x, q, scale, config=config, backend="triton"), out)
    ref = linear_fp8(x, q, scale, backend="reference")
    assert torch.equal(ref, linear_fp8_reference(x, q, scale))
    assert close(ref, want, dtype)


def test_linear_fp8_writes_out_and_reads_strided_rows():
    gen = torch.Generator().manual_seed(5)
    q, scale, w64 = fp8_weight(48, 80, gen)
    x = torch.randn(20, 160, generator=gen)[:, ::2]                 # rows with a column stride of 2
    out = torch.full((20, 48), float("nan"))
    got = linear_fp8(x, q, scale, out, config=SMALL, backend="triton")
    assert got is out
    assert close(out, x.double() @ w64.T, torch.float32)
    out_ref = torch.empty(20, 48)
    assert linear_fp8(x, q, scale, out_ref, backend="reference") is out_ref
    assert close(out_ref, x.double() @ w64.T, torch.float32)
    assert linear_fp8(x[:0], q, scale, backend="triton").shape == (0, 48)


def test_linear_fp8_checks_its_arguments():
    gen = torch.Generator().manual_seed(6)
    q, scale, _ = fp8_weight(8, 32, gen)
    x = torch.randn(4, 32, generator=gen)
    with pytest.raises(ValueError, match="does not fit weight"):
        linear_fp8(torch.randn(4, 31), q, scale)
    with pytest.raises(ValueError, match="does not fit weight"):
        linear_fp8(x[None], q, scale)
    with pytest.raises(ValueError, match="must be float8_e4m3fn"):
        linear_fp8(x, q.float(), scale)
    with pytest.raises(ValueError, match=r"scale must be float32 \[8\]"):
        linear_fp8(x, q, scale[:4])
    with pytest.raises(ValueError, match=r"scale must be float32 \[8\]"):
        linear_fp8(x, q, scale.double())
    with pytest.raises(ValueError, match="x must be one of"):
        linear_fp8(x.double(), q, scale)
    with pytest.raises(ValueError, match="out must be"):
        linear_fp8(x, q, scale, torch.empty(4, 9))
    with pytest.raises(ValueError, match="out must be"):
        linear_fp8(x, q, scale, torch.empty(4, 8, dtype=torch.float16))


def test_matmul_sends_fp8_products_above_the_gemv_rows_to_the_gemm(monkeypatch):
    """The triton backend on the CPU: 32 rows (2-D, and as [2, 16, K]) of an FP8 weight go to
    linear_fp8 and give the dequantized weight's F.linear; the reference backend dequantizes."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return linear_fp8(*args, **kwargs)

    monkeypatch.setattr(linear_module, "linear_fp8", counted)
    gen = torch.Generator().manual_seed(7)
    q, scale, _ = fp8_weight(72, 96, gen)
    x = torch.randn(32, 96, generator=gen)
    want = F.linear(x, dequantize_rows(q, scale, x.dtype))
    matmul = Matmul(KernelConfig(backend="triton"))
    out = matmul(x, q, scale)
    assert out.shape == (32, 72) and torch.allclose(out, want, rtol=1e-5, atol=1e-5)
    batched = matmul(x.view(2, 16, 96), q, scale)
    assert batched.shape == (2, 16, 72) and torch.allclose(batched.view(32, 72), want, rtol=1e-5, atol=1e-5)
    assert calls == [(32, 96), (32, 96)]
    assert torch.equal(Matmul(KernelConfig(backend="reference"))(x, q, scale), want)
    assert len(calls) == 2


@pytest.mark.gpu
def test_linear_fp8_bf16_prefill_shape_on_the_gpu():
    """A prefill-sized bf16 product (ragged M) against the float32-summed reference: both round the
    same float32 sums to bf16, which differ only in summation order, so outputs agree to a couple of
    bf16 units (2^-8 relative each) of the largest output; the default and the small-M tiles."""
    gen = torch.Generator(device="cuda").manual_seed(8)
    n, k = 3072, 3072
    w = torch.randn(n, k, generator=gen, device="cuda") * torch.rand(n, 1, generator=gen, device="cuda") / k ** 0.5
    q, scale = quantize_rows(w)
    for m in (2048, 2000, 48):
        x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
        out = linear_fp8(x, q, scale)
        ref = linear_fp8_reference(x, q, scale)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        peak = float(ref.float().abs().max())
        assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2 * peak), m
        dequantized = F.linear(x, dequantize_rows(q, scale, x.dtype))
        assert torch.allclose(out.float(), dequantized.float(), rtol=2e-2, atol=2e-2 * peak), m


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [40, 300])
def test_linear_fp8_fp16_and_fp32_on_the_gpu(dtype, m):
    """The other activation dtypes on the GPU tiles (float32: exact float32 products, fewer stages),
    with N and K off the tiles, against the float64 product of the dequantized weight."""
    gen = torch.Generator().manual_seed(9)
    q, scale, w64 = fp8_weight(1000, 1000, gen)
    x = torch.randn(m, 1000, generator=gen).to(dtype)
    out = linear_fp8(x.cuda(), q.cuda(), scale.cuda())
    assert close(out.cpu(), x.double() @ w64.T, dtype)
