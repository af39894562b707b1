"""The fused decode-step products (kernels/gemv.py) and the embedding lookup with sums of squares,
under the Triton interpreter, against float64 formulas written here: a residual stream carried
through add / normalise / SiLU products must equal the unfused chain RMSNorm -> product ->
SiLU-and-mul -> product -> residual add."""
import pytest
import torch
import torch.nn.functional as F

from stepvox.kernels import embedding_sumsq, linear_small_m_add_, rms_linear_small_m
from stepvox.kernels.gemv import _workspace

EPS = 1e-5


def rms_norm64(x, w):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def tol(dtype):
    return 2e-5 if dtype == torch.float32 else 4e-3


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
    from stepvox.kernels import use_backend
    with use_backend("reference"):
        r_ref = residual.clone()
        sq_ref = linear_small_m_add_(x, w, r_ref)
        act_ref = rms_linear_small_m(r_ref, torch.randn(32, 64, generator=gen), sq_ref, EPS, silu_and_mul=True)
    assert torch.allclose(sums[0][1], r_ref, atol=1e-5)
    assert torch.allclose(sums[0][0].sum(0), sq_ref[0], rtol=1e-5)
    assert act_ref.shape == (3, 16)


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
