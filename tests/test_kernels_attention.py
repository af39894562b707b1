"""Attention kernels (Triton, under the interpreter on CPU) against float64 SPEC references."""
import random

import pytest
import torch

from kernel_reference import attention_f64, rel_err, scatter_to_pages, spec_slopes
from stepvox.kernels import alibi_slopes, attention_decode, attention_prefill, use_backend

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


def test_slopes_follow_spec_and_slice_per_rank():
    for heads in (48, 96, 12, 7):
        assert torch.allclose(alibi_slopes(heads).double(), torch.tensor(spec_slopes(heads), dtype=torch.float64))
    full = alibi_slopes(96)
    parts = [alibi_slopes(96, tp_rank=r, tp_size=4) for r in range(4)]
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError):
        alibi_slopes(96, tp_rank=0, tp_size=5)


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
    fast = attention_prefill(q, k, v, cu, 33, slopes)
    with use_backend("reference"):
        ref = attention_prefill(q, k, v, cu, 33, slopes)
    assert torch.allclose(fast, ref, atol=1e-5)


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


@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("hq,hkv,dim,dtype", [(48, 4, 64, torch.float32), (12, 1, 128, torch.float16),
                                              (8, 2, 64, torch.float32), (4, 4, 32, torch.float16)])
def test_decode_paged_matches_reference(page, hq, hkv, dim, dtype):
    gen = torch.Generator().manual_seed(page * 3 + dim)
    seq_lens = [1, 17, 130, 0, 301]    # 0: a padding row, must come out as zeros
    num_pages = 128
    k_cache = torch.randn(num_pages, hkv, page, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, hkv, page, dim, generator=gen).to(dtype)
    table = torch.stack([torch.randperm(num_pages, generator=gen)[:24] for _ in seq_lens]).int()
    q = torch.randn(len(seq_lens), hq, dim, generator=gen).to(dtype)
    slopes = alibi_slopes(hq)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    # (launched ranges, keys per range at least): with 64 a 17-key sequence uses one of the three
    # launched ranges and a 301-key one all three, in the same launch
    for splits, min_keys in ((1, 256), (3, 16), (3, 64), (3, 256), (None, 256)):
        out = torch.full_like(q, float("nan"))
        attention_decode(q, k_cache, v_cache, table, lens, slopes, num_splits=splits, out=out,
                         min_keys_per_split=min_keys)
        for b, n in enumerate(seq_lens):
            if n == 0:
                assert torch.equal(out[b], torch.zeros_like(out[b]))
                continue
            pages = table[b].tolist()
            keys = torch.stack([k_cache[pages[j // page], :, j % page] for j in range(n)])
            values = torch.stack([v_cache[pages[j // page], :, j % page] for j in range(n)])
            ref = attention_f64(q[b:b + 1], keys, values, torch.tensor([n - 1]), torch.arange(n), slopes)
            assert rel_err(out[b:b + 1], ref) < TOL[dtype], (splits, min_keys, b, n)


def test_decode_tile_spanning_several_pages():
    """A 64-key tile over 16-key pages reads four table entries per step."""
    gen = torch.Generator().manual_seed(11)
    k_cache = torch.randn(40, 2, 16, 32, generator=gen)
    v_cache = torch.randn(40, 2, 16, 32, generator=gen)
    table = torch.randperm(40, generator=gen)[:20].int()[None]
    q = torch.randn(1, 6, 32, generator=gen)
    slopes = alibi_slopes(6)
    out = attention_decode(q, k_cache, v_cache, table, torch.tensor([200], dtype=torch.int32), slopes,
                           num_splits=2, block_n=64, min_keys_per_split=64)
    pages = table[0].tolist()
    keys = torch.stack([k_cache[pages[j // 16], :, j % 16] for j in range(200)])
    values = torch.stack([v_cache[pages[j // 16], :, j % 16] for j in range(200)])
    ref = attention_f64(q, keys, values, torch.tensor([199]), torch.arange(200), slopes)
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_with_new_key_writes_cache_and_attends_to_it(splits):
    """k_new/v_new: the newest key comes from the step's projection and lands in its cache slot."""
    gen = torch.Generator().manual_seed(21 + splits)
    hq, hkv, dim, page = 12, 2, 64, 16
    seq_lens = [1, 40, 129, 0]
    k_cache = torch.randn(64, hkv, page, dim, generator=gen)
    v_cache = torch.randn(64, hkv, page, dim, generator=gen)
    table = torch.stack([torch.randperm(64, generator=gen)[:10] for _ in seq_lens]).int()
    q = torch.randn(len(seq_lens), hq, dim, generator=gen)
    k_new = torch.randn(len(seq_lens), hkv, dim, generator=gen)
    v_new = torch.randn(len(seq_lens), hkv, dim, generator=gen)
    slots = torch.tensor([int(table[b, (n - 1) // page]) * page + (n - 1) % page if n else -1
                          for b, n in enumerate(seq_lens)])
    before = k_cache.clone()
    slopes = alibi_slopes(hq)
    for _ in range(2):          # twice: the split-merge counters must be reset by the first launch
        k_cache.copy_(before)
        out = torch.full_like(q, float("nan"))
        attention_decode(q, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int32), slopes,
                         k_new=k_new, v_new=v_new, new_slots=slots, num_splits=splits, out=out,
                         min_keys_per_split=16)
        for b, n in enumerate(seq_lens):
            if n == 0:
                assert torch.equal(out[b], torch.zeros_like(out[b]))
                continue
            s = int(slots[b])
            assert torch.equal(k_cache[s // page, :, s % page], k_new[b])
            assert torch.equal(v_cache[s // page, :, s % page], v_new[b])
            pages = table[b].tolist()
            keys = torch.stack([k_cache[pages[j // page], :, j % page] for j in range(n)])
            values = torch.stack([v_cache[pages[j // page], :, j % page] for j in range(n)])
            ref = attention_f64(q[b:b + 1], keys, values, torch.tensor([n - 1]), torch.arange(n), slopes)
            assert rel_err(out[b:b + 1], ref) < 2e-5, (b, n)
    untouched = torch.ones(64, page, dtype=torch.bool)
    for s in slots.tolist():
        if s >= 0:
            untouched[s // page, s % page] = False
    assert torch.equal(k_cache.permute(0, 2, 1, 3)[untouched], before.permute(0, 2, 1, 3)[untouched])
