"""SiLU-and-mul over a fused [gate | up] projection (kernels/activation.py; Triton under the
interpreter) against the float64 definition."""
import pytest
import torch

from stepvox.kernels import silu_and_mul, silu_and_mul_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_matches_definition(dtype):
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 2 * 1500, generator=gen) * 4).to(dtype)
    gate, up = x.double().chunk(2, -1)
    ref = (gate / (1 + torch.exp(-gate)) * up).to(dtype)
    out = silu_and_mul(x)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert out.shape == (6, 1500)
    assert torch.allclose(out.double(), ref.double(), rtol=tol, atol=tol)
    with pytest.raises(ValueError):
        silu_and_mul(torch.randn(2, 7))


def test_silu_and_mul_backends_and_pdl_flag():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 2 * 70, generator=gen)
    fast = silu_and_mul(x, backend="triton")
    assert fast.shape == (2, 3, 70)
    assert torch.equal(silu_and_mul(x, backend="triton", pdl=False), fast)
    ref = silu_and_mul(x, backend="reference")
    assert torch.equal(ref, silu_and_mul_reference(x))
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        silu_and_mul(x, backend=None)
