"""Paged decode attention (kernels/attention_decode.py; Triton under the interpreter on CPU)
against float64 SPEC references."""
import pytest
import torch

from reference_kernels import attention_f64, rel_err
from stepvox.kernels import alibi_slopes, attention_decode

TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


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


def test_decode_backends_and_pdl_flag_agree():
    """backend="reference" computes the same attention (and the same cache write) as the kernel;
    pdl=False launches the same kernel without the dependent-launch wait (no PDL on CPU either way)."""
    gen = torch.Generator().manual_seed(31)
    hq, hkv, dim, page = 8, 2, 32, 16
    seq_lens = torch.tensor([5, 40, 0], dtype=torch.int32)
    k_cache = torch.randn(12, hkv, page, dim, generator=gen)
    v_cache = torch.randn(12, hkv, page, dim, generator=gen)
    table = torch.randperm(12, generator=gen)[:9].int().view(3, 3)
    q = torch.randn(3, hq, dim, generator=gen)
    k_new = torch.randn(3, hkv, dim, generator=gen)
    v_new = torch.randn(3, hkv, dim, generator=gen)
    slots = torch.tensor([int(table[b, (n - 1) // page]) * page + (n - 1) % page if n else -1
                          for b, n in enumerate(seq_lens.tolist())])
    slopes = alibi_slopes(hq)
    results = {}
    for name, kw in (("triton", dict(backend="triton")), ("no_pdl", dict(backend="triton", pdl=False)),
                     ("reference", dict(backend="reference"))):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = attention_decode(q, kc, vc, table, seq_lens, slopes, k_new=k_new, v_new=v_new, new_slots=slots,
                               num_splits=2, min_keys_per_split=16, **kw)
        results[name] = (out, kc, vc)
    assert torch.equal(results["no_pdl"][0], results["triton"][0])
    for name in ("no_pdl", "reference"):
        assert torch.equal(results[name][1], results["triton"][1]) and torch.equal(results[name][2],
                                                                                   results["triton"][2])
    torch.testing.assert_close(results["reference"][0], results["triton"][0], atol=2e-5, rtol=2e-5)
    assert not results["triton"][0][2].any()                     # the padding row
    with pytest.raises(ValueError, match="backend"):
        attention_decode(q, k_cache, v_cache, table, seq_lens, slopes, backend="fast")
