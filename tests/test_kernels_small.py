"""KV write, RMSNorm and SiLU-and-mul kernels (Triton under the interpreter) against references."""
import pytest
import torch

from stepvox.kernels import linear_small_m, rms_norm, silu_and_mul, write_kv
from stepvox.kernels.gemv import _workspace


@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_places_rows_and_skips_padding(page, dtype):
    gen = torch.Generator().manual_seed(page)
    heads, dim, pages = 4, 64, 10
    k_cache = torch.full((pages, heads, page, dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(pages * page, generator=gen)[:23]
    slots[5] = -1
    k = torch.randn(23, heads, dim, generator=gen).to(dtype)
    v = torch.randn(23, heads, dim, generator=gen).to(dtype)
    write_kv(k, v, k_cache, v_cache, slots)
    written = 0
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        assert torch.equal(k_cache[s // page, :, s % page], k[t])
        assert torch.equal(v_cache[s // page, :, s % page], v[t])
        written += 1
    # nothing else was touched: exactly the written rows are finite
    assert int((~torch.isnan(k_cache[..., 0])).sum()) == written * heads
    assert int((~torch.isnan(v_cache[..., 0])).sum()) == written * heads


def test_write_kv_rejects_mismatched_shapes():
    cache = torch.zeros(4, 2, 16, 64)
    with pytest.raises(ValueError):
        write_kv(torch.zeros(3, 4, 64), torch.zeros(3, 4, 64), cache, cache.clone(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        write_kv(torch.zeros(3, 2, 64), torch.zeros(3, 2, 64), cache, cache.clone(), torch.zeros(2, dtype=torch.long))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,split", [(1, 70, 96, 1), (3, 48, 200, 3), (16, 33, 256, 4), (5, 64, 64, 8)])
def test_linear_small_m_matches_matmul_with_k_split(dtype, m, n, k, split):
    """Ragged N and K, several K ranges merged through the workspace slots; a second product on the
    same workspace must not see the first one's partial sums; the same product twice is identical
    (the slots are summed in K order)."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    cfg = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=split, num_warps=4, num_stages=1)
    for rep in range(2):
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
        out = linear_small_m(x, w, config=cfg)
        ref = (x.double() @ w.double().T)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert out.dtype == dtype and out.shape == (m, n)
        assert torch.allclose(out.double(), ref, rtol=tol, atol=tol), f"rep {rep}"
        assert torch.equal(linear_small_m(x, w, config=cfg), out)
    work, counters = _workspace(x.device)
    assert not counters.any()                          # left zero for the next split product


def test_linear_small_m_rejects_mismatched_weight():
    with pytest.raises(ValueError):
        linear_small_m(torch.randn(2, 8), torch.randn(4, 9))



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_rows_first_maximum_across_chunks(dtype):
    """Rows wider than one chunk; ties inside a block, across blocks and across chunks all go to
    the lowest index, as torch.argmax does; NaN is never chosen."""
    from stepvox.kernels.argmax import CHUNK, argmax_rows
    gen = torch.Generator().manual_seed(3)
    v = 2 * CHUNK + 777
    x = torch.randn(5, v, generator=gen).to(dtype)
    x[1, [10, CHUNK + 5, 2 * CHUNK + 3]] = 9.0           # tie across chunks: first wins
    x[2, [2 * CHUNK + 700, 2 * CHUNK + 701]] = 9.0       # tie in the last, partial chunk
    x[3, [1500, 1100]] = 9.0                             # tie inside one chunk, across blocks
    x[4, 7] = float("nan")
    x[4, 8] = 9.0
    for _ in range(2):                                   # the counters must be reset by a launch
        got = argmax_rows(x)
        expected = x.float().nan_to_num(nan=float("-inf")).argmax(-1)
        assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert got[1] == 10 and got[2] == 2 * CHUNK + 700 and got[3] == 1100 and got[4] == 8
