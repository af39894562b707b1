"""Skinny products of the decode step (kernels/gemv.py) under the Triton interpreter: the plain
product with ragged shapes and split K against float64 matmuls, and the fused decode-step
products against float64 formulas written here: a residual stream carried through add / normalise
/ SiLU products must equal the unfused chain RMSNorm -> product -> SiLU-and-mul -> product ->
residual add."""
import pytest
import torch
import torch.nn.functional as F

from stepvox.kernels import embedding_sumsq, linear_small_m, linear_small_m_add_, rms_linear_small_m
from stepvox.kernels.gemv import _workspace

EPS = 1e-5


def rms_norm64(x, w):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def tol(dtype):
    return 2e-5 if dtype == torch.float32 else 4e-3


# ------------------------------------------------------------------ plain product
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


def test_linear_small_m_backend_and_pdl_arguments():
    """backend="reference" is F.linear; the kernel with pdl=False is the same launch as with pdl=True
    (no PDL on CPU either way); an unknown backend is refused."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 96, generator=gen)
    w = torch.randn(40, 96, generator=gen) / 10
    cfg = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1)
    fast = linear_small_m(x, w, config=cfg, backend="triton")
    assert torch.equal(linear_small_m(x, w, config=cfg, backend="triton", pdl=False), fast)
    assert torch.equal(linear_small_m(x, w, backend="reference"), F.linear(x, w))
    torch.testing.assert_close(fast, F.linear(x, w), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        linear_small_m(x, w, backend="gpu")


# ------------------------------------------------------------------ fused decode-step products
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,hidden,inter,split", [(1, 64, 96, 1), (5, 96, 160, 3), (16, 48, 64, 2)])
def test_fused_chain_matches_norm_product_silu_residual(dtype, m, hidden, inter, split):
    gen = torch.Generator().manual_seed(m * 100 + hidden + split)
    cfg = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=split, num_warps=4, num_stages=1)
    vocab = 50
    table = torch.randn(vocab, hidden, generator=gen).to(dtype)
    norm_w = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)
    w_gu = (torch.randn(2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w_down = (torch.randn(hidden, inter, generator=gen) / inter ** 0.5).to(dtype)
    w_gu_folded = (w_gu.float() * norm_w.float()).to(dtype)
    ids = torch.randint(0, vocab, (m,), generator=gen)

    residual, sumsq = embedding_sumsq(ids, table)
    assert torch.equal(residual, table[ids])
    assert torch.allclose(sumsq[0].double(), table[ids].double().pow(2).sum(1), rtol=1e-5)

    # normalise + gate|up + SiLU-and-mul in one product
    act = rms_linear_small_m(residual, w_gu_folded, sumsq, EPS, silu_and_mul=True, config=cfg)
    gate, up = (rms_norm64(table[ids], norm_w) @ w_gu.double().T).chunk(2, dim=-1)
    want_act = F.silu(gate) * up
    assert act.shape == (m, inter) and act.dtype == dtype
    assert torch.allclose(act.double(), want_act, rtol=tol(dtype), atol=tol(dtype))

    # down product added to the residual in place, with the new rows' sums of squares
    before = residual.clone()
    sumsq2 = linear_small_m_add_(act, w_down, residual, config=cfg)
    want_res = before.double() + act.double() @ w_down.double().T
    assert torch.allclose(residual.double(), want_res, rtol=tol(dtype), atol=tol(dtype))
    assert sumsq2.shape[1] == m and sumsq2.shape[0] == -(-hidden // 16)      # one slot per row block
    assert torch.allclose(sumsq2.sum(0).double(), residual.double().pow(2).sum(1), rtol=1e-4)

    # the next normalised product reads those slots: plain (no SiLU) output
    w_q = (torch.randn(hidden + 8, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    q = rms_linear_small_m(residual, (w_q.float() * norm_w.float()).to(dtype), sumsq2, EPS, config=cfg)
    want_q = rms_norm64(residual, norm_w) @ w_q.double().T
    assert torch.allclose(q.double(), want_q, rtol=tol(dtype), atol=tol(dtype))
    _, counters = _workspace(residual.device)
    assert not counters.any()                              # split products leave the counters zero


def test_fused_products_are_deterministic_and_match_their_references():
    gen = torch.Generator().manual_seed(7)
    cfg = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=4, num_warps=4, num_stages=1)
    x = torch.randn(3, 128, generator=gen)
    w = torch.randn(64, 128, generator=gen) / 11
    residual = torch.randn(3, 64, generator=gen)
    sums = []
    for _ in range(2):
        r = residual.clone()
        sums.append((linear_small_m_add_(x, w, r, config=cfg), r))
    assert torch.equal(sums[0][0], sums[1][0]) and torch.equal(sums[0][1], sums[1][1])
    r_ref = residual.clone()
    sq_ref = linear_small_m_add_(x, w, r_ref, backend="reference")
    act_ref = rms_linear_small_m(r_ref, torch.randn(32, 64, generator=gen), sq_ref, EPS, silu_and_mul=True,
                                 backend="reference")
    assert torch.allclose(sums[0][1], r_ref, atol=1e-5)
    assert torch.allclose(sums[0][0].sum(0), sq_ref[0], rtol=1e-5)
    assert act_ref.shape == (3, 16)


def test_fused_products_pdl_flag_changes_nothing():
    """pdl=False launches the same kernels without the dependent-launch wait: bit-identical results."""
    gen = torch.Generator().manual_seed(8)
    cfg = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1)
    x = torch.randn(2, 64, generator=gen)
    w = torch.randn(48, 64, generator=gen) / 8
    w_gu = torch.randn(32, 48, generator=gen) / 7
    outs = []
    for pdl in (True, False):
        r = torch.randn(2, 48, generator=torch.Generator().manual_seed(9))
        sq = linear_small_m_add_(x, w, r, config=cfg, pdl=pdl)
        act = rms_linear_small_m(r, w_gu, sq, EPS, silu_and_mul=True, config=cfg, pdl=pdl)
        outs.append((sq, r, act))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_fused_products_reject_bad_shapes():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="sumsq"):
        rms_linear_small_m(x, torch.randn(4, 8), torch.randn(3, 5), EPS)
    with pytest.raises(ValueError, match="even"):
        rms_linear_small_m(x, torch.randn(5, 8), torch.randn(1, 2), EPS, silu_and_mul=True)
    with pytest.raises(ValueError, match="residual"):
        linear_small_m_add_(x, torch.randn(4, 8), torch.randn(2, 5))
    with pytest.raises(ValueError, match="does not fit"):
        linear_small_m_add_(x, torch.randn(4, 9), torch.randn(2, 4))


# ------------------------------------------------------------------ FP8 weights (W8A16)
def fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 row scales, the float64 weight they stand for)."""
    scale = w.abs().amax(1).clamp_min(1e-12) / 448.0
    q = (w / scale[:, None]).to(torch.float8_e4m3fn)
    return q, scale, q.double() * scale.double()[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,split", [(1, 70, 96, 1), (3, 48, 200, 3), (16, 33, 256, 4)])
def test_fp8_weight_product_matches_the_dequantized_float64_one(dtype, m, n, k, split):
    gen = torch.Generator().manual_seed(m * 7 + n + k)
    cfg = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=split, num_warps=4, num_stages=1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q, scale, w64 = fp8_rows(torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 3)
    out = linear_small_m(x, q, config=cfg, scale=scale)
    want = x.double() @ w64.T
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.allclose(out.double(), want, rtol=tol(dtype), atol=tol(dtype) * float(want.abs().max()))
    assert torch.equal(linear_small_m(x, q, config=cfg, scale=scale), out)          # deterministic
    ref = linear_small_m(x, q, scale=scale, backend="reference")
    assert torch.allclose(ref.double(), want, rtol=tol(dtype), atol=tol(dtype) * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_fused_products_match_their_float64_formulas(dtype):
    gen = torch.Generator().manual_seed(11)
    m, hidden, inter = 4, 96, 160
    cfg = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, num_warps=4, num_stages=1)
    residual = torch.randn(m, hidden, generator=gen).to(dtype)
    sumsq = residual.float().pow(2).sum(1)[None, :]
    q_gu, s_gu, w_gu = fp8_rows(torch.randn(2 * inter, hidden, generator=gen))
    q_down, s_down, w_down = fp8_rows(torch.randn(hidden, inter, generator=gen) / inter ** 0.5)
    norm_w = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)       # applied in the kernel, not folded
    act = rms_linear_small_m(residual, q_gu, sumsq, EPS, silu_and_mul=True, config=cfg, scale=s_gu,
                             norm_weight=norm_w)
    gate, up = (rms_norm64(residual, norm_w) @ w_gu.T).chunk(2, dim=-1)
    want = F.silu(gate) * up
    assert torch.allclose(act.double(), want, rtol=tol(dtype), atol=tol(dtype) * float(want.abs().max()))
    before = residual.clone()
    linear_small_m_add_(act, q_down, residual, config=cfg, scale=s_down)
    want_res = before.double() + act.double() @ w_down.T
    assert torch.allclose(residual.double(), want_res, rtol=tol(dtype), atol=tol(dtype) * float(want_res.abs().max()))
    ref = rms_linear_small_m(before, q_gu, sumsq, EPS, silu_and_mul=True, scale=s_gu, norm_weight=norm_w,
                             backend="reference")
    assert torch.allclose(ref.double(), want, rtol=tol(dtype), atol=tol(dtype) * float(want.abs().max()))


def test_fp8_weights_and_scales_are_checked():
    x = torch.randn(2, 32)
    q, scale, _ = fp8_rows(torch.randn(8, 32))
    with pytest.raises(ValueError, match="needs its row scales"):
        linear_small_m(x, q)
    with pytest.raises(ValueError, match="row scales go with a float8_e4m3fn weight"):
        linear_small_m(x, q.float(), scale=scale)
    with pytest.raises(ValueError, match=r"float32 \[8\]"):
        linear_small_m(x, q, scale=scale[:4])
