"""Varlen prefill attention (kernels/attention_prefill.py; Triton under the interpreter on CPU)
against float64 SPEC references."""
import random

import pytest
import torch

from reference_kernels import attention_f64, rel_err, scatter_to_pages
from stepvox.kernels import alibi_slopes, attention_prefill

# (query heads, KV heads, head dim): the TTS model, a TP=8 rank of the chat model (96/8 heads,
# d 128, 12 query heads per KV head), and two other GQA ratios.
LAYOUTS = [(48, 4, 64), (12, 1, 128), (8, 2, 64), (4, 4, 32)]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def _packed(lens, hq, hkv, dim, dtype, gen):
    total = sum(lens)
    q = torch.randn(total, hq, dim, generator=gen).to(dtype)
    k = torch.randn(total, hkv, dim, generator=gen).to(dtype)
    v = torch.randn(total, hkv, dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("hq,hkv,dim", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_varlen_matches_reference(hq, hkv, dim, dtype):
    gen = torch.Generator().manual_seed(hq * 1000 + dim + (dtype == torch.float16))
    lens = [1, 17, 130] if hq <= 12 or dtype == torch.float32 else [17, 70]
    q, k, v, cu = _packed(lens, hq, hkv, dim, dtype, gen)
    slopes = alibi_slopes(hq)
    out = torch.full_like(q, float("nan"))
    attention_prefill(q, k, v, cu, max(lens), slopes, out=out)
    for b, n in enumerate(lens):
        lo = int(cu[b])
        pos = torch.arange(n)
        ref = attention_f64(q[lo:lo + n], k[lo:lo + n], v[lo:lo + n], pos, pos, slopes)
        assert rel_err(out[lo:lo + n], ref) < TOL[dtype], (b, n)


@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("hq,hkv,dim,dtype", [(48, 4, 64, torch.float32), (12, 1, 128, torch.float16),
                                              (8, 2, 64, torch.float16)])
def test_prefill_with_paged_prefix(page, hq, hkv, dim, dtype):
    """New tokens at positions ctx.. attend to ctx cached keys (shuffled pages) plus themselves."""
    gen = torch.Generator().manual_seed(7 + page + dim)
    rnd = random.Random(page + hq)
    lens, ctxs = [3, 1, 40], [5, 130, 0]
    q, k, v, cu = _packed(lens, hq, hkv, dim, dtype, gen)
    num_pages = 64
    k_cache = torch.randn(num_pages, hkv, page, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, hkv, page, dim, generator=gen).to(dtype)
    free = list(range(num_pages))
    rnd.shuffle(free)
    table = torch.zeros(len(lens), 12, dtype=torch.int32)
    prefixes = []
    for b, c in enumerate(ctxs):
        pages = [free.pop() for _ in range(-(-c // page))]
        table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        pk = torch.randn(c, hkv, dim, generator=gen).to(dtype)
        pv = torch.randn(c, hkv, dim, generator=gen).to(dtype)
        scatter_to_pages(pk, k_cache, pages)
        scatter_to_pages(pv, v_cache, pages)
        prefixes.append((pk, pv))
    slopes = alibi_slopes(hq)
    out = torch.full_like(q, float("nan"))
    attention_prefill(q, k, v, cu, max(lens), slopes, k_cache=k_cache, v_cache=v_cache, block_table=table,
                      context_lens=torch.tensor(ctxs, dtype=torch.int32), out=out)
    for b, (n, c) in enumerate(zip(lens, ctxs)):
        lo = int(cu[b])
        keys = torch.cat([prefixes[b][0], k[lo:lo + n]])
        values = torch.cat([prefixes[b][1], v[lo:lo + n]])
        ref = attention_f64(q[lo:lo + n], keys, values, torch.arange(c, c + n), torch.arange(c + n), slopes)
        assert rel_err(out[lo:lo + n], ref) < TOL[dtype], (b, n, c)


@pytest.mark.parametrize("degree,poly_dist", [(3, 32), (2, 96)])
def test_prefill_polynomial_root_error_is_bounded(degree, poly_dist):
    """Far tiles replace sqrt by a Taylor polynomial; its error stays far below bf16 resolution."""
    gen = torch.Generator().manual_seed(degree)
    lens = [300]
    q, k, v, cu = _packed(lens, 4, 2, 32, torch.float32, gen)
    slopes = alibi_slopes(4) * 4   # steeper than any real slope: a harder test of the bias
    cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, POLY_DIST=poly_dist, POLY_DEGREE=degree, TMA=False)
    out = attention_prefill(q, k, v, cu, 300, slopes, config=cfg)
    pos = torch.arange(300)
    err = rel_err(out, attention_f64(q, k, v, pos, pos, slopes))
    assert err < 2e-4
    exact = attention_prefill(q, k, v, cu, 300, slopes, config=dict(cfg, POLY_DIST=0))
    assert rel_err(exact, attention_f64(q, k, v, pos, pos, slopes)) < 2e-5


def test_prefill_reference_backend_agrees():
    gen = torch.Generator().manual_seed(3)
    q, k, v, cu = _packed([5, 33], 8, 2, 64, torch.float32, gen)
    slopes = alibi_slopes(8)
    fast = attention_prefill(q, k, v, cu, 33, slopes, backend="triton")
    ref = attention_prefill(q, k, v, cu, 33, slopes, backend="reference")
    assert torch.allclose(fast, ref, atol=1e-5)
    # "auto" on CPU tensors under TRITON_INTERPRET=1 is the interpreter: the same launch as "triton"
    assert torch.equal(attention_prefill(q, k, v, cu, 33, slopes), fast)
    with pytest.raises(ValueError, match="backend"):
        attention_prefill(q, k, v, cu, 33, slopes, backend="cuda")


def test_prefill_rejects_bad_shapes():
    q = torch.randn(4, 6, 64)
    k = torch.randn(4, 4, 64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="query heads"):
        attention_prefill(q, k, k, cu, 4, alibi_slopes(6))
    with pytest.raises(ValueError, match="slope"):
        attention_prefill(torch.randn(4, 8, 64), k, k, cu, 4, alibi_slopes(6))
    with pytest.raises(ValueError, match="context_lens"):
        attention_prefill(torch.randn(4, 8, 64), k, k, cu, 4, alibi_slopes(8), context_lens=torch.zeros(1))


