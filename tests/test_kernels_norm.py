"""RMSNorm with the optional fused residual add (kernels/norm.py; Triton under the interpreter)
against the float64 definition."""
import pytest
import torch

from stepvox.kernels import rms_norm, rms_norm_reference


def _rms_f64(x, w, eps):
    xd = x.double()
    y = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)   # cast back, then weight
    return (y.double() * w.double()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 3072, 300])
def test_rms_norm_matches_definition(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(7, hidden, generator=gen) * 3).to(dtype)
    w = torch.randn(hidden, generator=gen).to(dtype)
    out = rms_norm(x, w, 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert torch.allclose(out.double(), _rms_f64(x, w, 1e-5).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_fused_residual_updates_in_place(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 256, generator=gen).to(dtype)
    res = torch.randn(5, 256, generator=gen).to(dtype)
    w = torch.randn(256, generator=gen).to(dtype)
    expected_sum = x + res                         # rounded to dtype, as the eager model adds
    res_in = res.clone()
    out, res_out = rms_norm(x, w, 1e-5, res_in)
    assert res_out.data_ptr() == res_in.data_ptr()
    assert torch.equal(res_in, expected_sum)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert torch.allclose(out.double(), _rms_f64(expected_sum, w, 1e-5).double(), rtol=tol, atol=tol)


def test_rms_norm_backends_and_pdl_flag():
    """backend="reference" is the plain-PyTorch formula (also in place on the residual); pdl=False
    launches the same kernel (no PDL on CPU either way); an unknown backend is refused."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 96, generator=gen)
    res = torch.randn(4, 96, generator=gen)
    w = torch.randn(96, generator=gen)
    fast = rms_norm(x, w, 1e-5, backend="triton")
    assert torch.equal(rms_norm(x, w, 1e-5, backend="triton", pdl=False), fast)
    ref = rms_norm(x, w, 1e-5, backend="reference")
    assert torch.equal(ref, rms_norm_reference(x, w, 1e-5))
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    res_ref = res.clone()
    out_ref, back = rms_norm(x, w, 1e-5, res_ref, backend="reference")
    assert back is res_ref and torch.equal(res_ref, x + res)
    res_fast = res.clone()
    out_fast, _ = rms_norm(x, w, 1e-5, res_fast, backend="triton")
    assert torch.equal(res_fast, res_ref)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, 1e-5, backend="torch")
