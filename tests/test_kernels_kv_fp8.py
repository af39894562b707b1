"""The FP8 KV cache's kernels (Triton under the interpreter): the quantizing write agrees bit for bit
with torch's rounding, stays within e4m3's bound and saturates; decode and prefill attention over an
FP8 cache match a float64 reference of the dequantized math."""
import math

import pytest
import torch

from stepvox.kernels import alibi_slopes, attention_decode, attention_prefill, sqrt_alibi_bias, write_kv
from stepvox.kernels.fp8 import E4M3_MAX, FP8_DTYPE
from stepvox.kernels.kv_cache import gather_pages, quantize_kv, write_kv_reference


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def fp8_pair(pages: int, heads: int, page: int, dim: int):
    k = torch.zeros(pages, heads, page, dim, dtype=FP8_DTYPE)
    return k, torch.zeros_like(k)


def test_the_quantizing_write_rounds_like_torch():
    """Values on every binade of e4m3 (subnormals too), exact ties between two e4m3 values, the
    tops of binades (where a rounded-up mantissa carries into the exponent) and values past the
    range: the kernel's bytes equal torch's round-to-nearest-even cast of the saturated value."""
    grid = torch.tensor(sorted({float(x) for x in torch.arange(0, 256, dtype=torch.uint8)
                                .view(FP8_DTYPE).float() if math.isfinite(x)}))
    grid = grid[grid >= 0]
    ties = (grid[1:] + grid[:-1]) / 2                          # exactly between neighbours
    near = torch.cat([grid * (1 + 2.0 ** -6), grid * (1 - 2.0 ** -6), ties * (1 + 2.0 ** -12)])
    values = torch.cat([grid, ties, near, torch.tensor([449.0, 464.0, 470.0, 1000.0, 1e6])])
    values = torch.cat([values, -values])
    dim = 32
    values = torch.cat([values, torch.zeros(-len(values) % (2 * dim))]).view(-1, 2, dim)
    kc, vc = fp8_pair(len(values) // 4 + 1, 2, 4, dim)
    kr, vr = fp8_pair(len(values) // 4 + 1, 2, 4, dim)
    scale = torch.ones(2)
    slots = torch.arange(len(values))
    write_kv(values, -values, kc, vc, slots, k_scale=scale, v_scale=scale, backend="triton")
    write_kv_reference(values, -values, kr, vr, slots, scale, scale)
    assert torch.equal(as_bytes(kc), as_bytes(kr)) and torch.equal(as_bytes(vc), as_bytes(vr))
    stored = gather_pages(kc, torch.arange(kc.shape[0], dtype=torch.int32), len(values), scale)
    assert stored.abs().max() == E4M3_MAX                     # saturated, never inf or NaN
    assert torch.isfinite(stored).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_the_quantizing_write_is_within_e4m3s_bound_and_skips_padding(backend):
    gen = torch.Generator().manual_seed(0)
    heads, dim, page = 4, 64, 16
    k = torch.randn(50, heads, dim, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 500.0])[None, :, None]
    v = torch.randn(50, heads, dim, generator=gen)
    k_scale = k.abs().amax(dim=(0, 2)) / E4M3_MAX             # in range: no saturation
    v_scale = v.abs().amax(dim=(0, 2)) / E4M3_MAX
    kc, vc = fp8_pair(8, heads, page, dim)
    kc.view(torch.uint8).fill_(0x7F)                          # NaN: what the write must not touch
    slots = torch.randperm(8 * page, generator=gen)[:50]
    slots[[3, 17]] = -1
    write_kv(k, v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale, backend=backend)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        for x, cache, scale in ((k[t], kc, k_scale), (v[t], vc, v_scale)):
            back = cache[s // page, :, s % page].float() * scale[:, None]
            bound = torch.maximum(x.abs() * 2.0 ** -4, scale[:, None] * 2.0 ** -10)
            assert ((back - x).abs() <= bound * 1.0001).all()
    assert int((~torch.isnan(kc[..., 0].float())).sum()) == 48 * heads


def reference_attention(q, keys, values, q_pos, k_pos, slopes, scale):
    """float64: q [M, Hq, D] at positions q_pos over keys/values [N, Hkv, D] at k_pos (causal)."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * scale
    scores = scores + sqrt_alibi_bias(slopes.double(), q_pos, k_pos).double()
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


def scales_for(x: torch.Tensor) -> torch.Tensor:
    return (x.abs().amax(dim=(0, 2)) * 1.5 / E4M3_MAX).float()


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_over_an_fp8_cache_matches_float64(num_splits):
    """GQA (4 query heads a KV head), split ranges, the newest key from registers at full precision
    and written to the cache quantized, a sequence of only its new key, and a padding row."""
    gen = torch.Generator().manual_seed(num_splits)
    hq, hkv, dim, page = 8, 2, 32, 16
    lengths = [70, 1, 33, 0]
    kc, vc = fp8_pair(24, hkv, page, dim)
    history_k = torch.randn(sum(lengths), hkv, dim, generator=gen) * 3
    history_v = torch.randn(sum(lengths), hkv, dim, generator=gen)
    k_scale, v_scale = scales_for(history_k), scales_for(history_v)
    table = torch.randperm(24, generator=gen)[:20].to(torch.int32).view(4, 5)
    slots = torch.cat([table[b, torch.arange(n) // page].long() * page + torch.arange(n) % page
                       for b, n in enumerate(lengths)])
    write_kv(history_k, history_v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
    q = torch.randn(4, hq, dim, generator=gen)
    k_new = torch.randn(4, hkv, dim, generator=gen)
    v_new = torch.randn(4, hkv, dim, generator=gen)
    seq_lens = torch.tensor([n + 1 if n else 0 for n in lengths[:3]] + [0], dtype=torch.int32)
    new_slots = torch.tensor([int(table[b, n // page]) * page + n % page if seq_lens[b] else -1
                              for b, n in enumerate(lengths)])
    slopes = alibi_slopes(hq, 0, 1)
    before_k, before_v = kc.clone(), vc.clone()
    out = attention_decode(q, kc, vc, table, seq_lens, slopes, k_new=k_new, v_new=v_new, new_slots=new_slots,
                           k_scale=k_scale, v_scale=v_scale, num_splits=num_splits, backend="triton")
    for b, n in enumerate(lengths):
        if not seq_lens[b]:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        keys = torch.cat([gather_pages(before_k, table[b], n, k_scale), k_new[b:b + 1]]) if n else k_new[b:b + 1]
        values = torch.cat([gather_pages(before_v, table[b], n, v_scale), v_new[b:b + 1]]) if n else v_new[b:b + 1]
        pos = torch.arange(n + 1)
        want = reference_attention(q[b:b + 1], keys, values, pos[-1:], pos, slopes, dim ** -0.5)[0]
        torch.testing.assert_close(out[b].double(), want, atol=2e-5, rtol=1e-4)
    # the new rows went into their slots exactly as write_kv quantizes them
    expect_k, expect_v = before_k.clone(), before_v.clone()
    write_kv_reference(k_new, v_new, expect_k, expect_v, new_slots, k_scale, v_scale)
    assert torch.equal(as_bytes(kc), as_bytes(expect_k)) and torch.equal(as_bytes(vc), as_bytes(expect_v))
    # and the reference backend computes the same
    kr, vr = before_k.clone(), before_v.clone()
    ref = attention_decode(q, kr, vr, table, seq_lens, slopes, k_new=k_new, v_new=v_new, new_slots=new_slots,
                           k_scale=k_scale, v_scale=v_scale, backend="reference")
    torch.testing.assert_close(ref, out, atol=2e-5, rtol=1e-4)
    assert torch.equal(as_bytes(kr), as_bytes(kc))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_over_an_fp8_context_matches_float64(dtype):
    """Two chunks with cached context read from an FP8 cache (long enough for the kernel's
    polynomial far tiles and its exact near tiles) and new keys used as given."""
    gen = torch.Generator().manual_seed(7)
    hq, hkv, dim, page = 4, 2, 32, 16
    ctx, new = [150, 20], [37, 64]
    kc, vc = fp8_pair(20, hkv, page, dim)
    table = torch.randperm(20, generator=gen)[:20].to(torch.int32).view(2, 10)
    cached_k = [torch.randn(n, hkv, dim, generator=gen) * 2 for n in ctx]
    cached_v = [torch.randn(n, hkv, dim, generator=gen) for n in ctx]
    k_scale = scales_for(torch.cat(cached_k))
    v_scale = scales_for(torch.cat(cached_v))
    for b, n in enumerate(ctx):
        slots = table[b, torch.arange(n) // page].long() * page + torch.arange(n) % page
        write_kv(cached_k[b], cached_v[b], kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
    q = torch.randn(sum(new), hq, dim, generator=gen).to(dtype)
    k = torch.randn(sum(new), hkv, dim, generator=gen).to(dtype)
    v = torch.randn(sum(new), hkv, dim, generator=gen).to(dtype)
    cu = torch.tensor([0, new[0], sum(new)], dtype=torch.int32)
    slopes = alibi_slopes(hq, 0, 1)
    out = attention_prefill(q, k, v, cu, max(new), slopes, k_cache=kc, v_cache=vc, block_table=table,
                            context_lens=torch.tensor(ctx, dtype=torch.int32), k_scale=k_scale, v_scale=v_scale,
                            backend="triton")
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    for b in range(2):
        lo, hi = int(cu[b]), int(cu[b + 1])
        keys = torch.cat([gather_pages(kc, table[b], ctx[b], k_scale), k[lo:hi].float()])
        values = torch.cat([gather_pages(vc, table[b], ctx[b], v_scale), v[lo:hi].float()])
        want = reference_attention(q[lo:hi], keys, values, torch.arange(ctx[b], ctx[b] + hi - lo),
                                   torch.arange(ctx[b] + hi - lo), slopes, dim ** -0.5)
        torch.testing.assert_close(out[lo:hi].double(), want, **tol)


def test_fp8_caches_need_their_scales():
    kc, vc = fp8_pair(4, 2, 16, 32)
    k = torch.zeros(3, 2, 32)
    slots = torch.arange(3)
    with pytest.raises(ValueError, match="needs k_scale"):
        write_kv(k, k, kc, vc, slots)
    with pytest.raises(ValueError, match=r"needs v_scale as float32 \[2\]"):
        write_kv(k, k, kc, vc, slots, k_scale=torch.ones(2), v_scale=torch.ones(3))
    with pytest.raises(ValueError, match="go with an FP8 cache"):
        write_kv(k, k, torch.zeros(4, 2, 16, 32), torch.zeros(4, 2, 16, 32), slots, k_scale=torch.ones(2),
                 v_scale=torch.ones(2))
    with pytest.raises(ValueError, match="needs k_scale"):
        attention_decode(torch.zeros(1, 4, 32), kc, vc, torch.zeros(1, 2, dtype=torch.int32),
                         torch.ones(1, dtype=torch.int32), alibi_slopes(4, 0, 1))


def test_quantize_kv_saturates_and_keeps_zeros():
    x = torch.tensor([[[0.0, 1.0, -1e9, 1e9]]])
    q = quantize_kv(x, torch.tensor([0.5]))
    assert q.float().tolist() == [[[0.0, 2.0, -E4M3_MAX, E4M3_MAX]]]


@pytest.mark.gpu
def test_fp8_kv_kernels_in_bf16_on_the_gpu():
    """On the GPU (the hardware's float8 cast, bf16 dots, the tiles the engine uses): the write is
    torch's rounding bit for bit; decode (split) and prefill over the FP8 cache match float64 within
    bf16's rounding of q and of the probabilities."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    hq, hkv, dim, page, pages = 16, 2, 128, 16, 64
    kc = torch.zeros(pages, hkv, page, dim, dtype=FP8_DTYPE, device=dev)
    vc = torch.zeros_like(kc)
    n = 700
    k = (torch.randn(n, hkv, dim, generator=gen, device=dev) * 3).bfloat16()
    v = torch.randn(n, hkv, dim, generator=gen, device=dev).bfloat16()
    k_scale, v_scale = scales_for(k.float()), scales_for(v.float())
    table = torch.randperm(pages, generator=gen, device=dev)[:48].to(torch.int32).view(1, 48)
    slots = table[0, torch.arange(n, device=dev) // page].long() * page + torch.arange(n, device=dev) % page
    write_kv(k, v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    write_kv_reference(k, v, kr, vr, slots, k_scale, v_scale)
    assert torch.equal(as_bytes(kc), as_bytes(kr)) and torch.equal(as_bytes(vc), as_bytes(vr))
    slopes = alibi_slopes(hq, 0, 1).to(dev)
    keys, values = gather_pages(kc, table[0], n, k_scale), gather_pages(vc, table[0], n, v_scale)
    q = torch.randn(1, hq, dim, generator=gen, device=dev).bfloat16()
    pos = torch.arange(n, device=dev)
    out = attention_decode(q, kc, vc, table, torch.tensor([n], dtype=torch.int32, device=dev), slopes,
                           k_scale=k_scale, v_scale=v_scale, num_splits=4)
    want = reference_attention(q, keys, values, pos[-1:], pos, slopes, dim ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)
    new = 300
    qn = torch.randn(new, hq, dim, generator=gen, device=dev).bfloat16()
    kn = torch.randn(new, hkv, dim, generator=gen, device=dev).bfloat16()
    vn = torch.randn(new, hkv, dim, generator=gen, device=dev).bfloat16()
    cu = torch.tensor([0, new], dtype=torch.int32, device=dev)
    out = attention_prefill(qn, kn, vn, cu, new, slopes, k_cache=kc, v_cache=vc, block_table=table,
                            context_lens=torch.tensor([n], dtype=torch.int32, device=dev), k_scale=k_scale,
                            v_scale=v_scale)
    all_pos = torch.arange(n + new, device=dev)
    want = reference_attention(qn, torch.cat([keys, kn.float()]), torch.cat([values, vn.float()]), all_pos[n:],
                               all_pos, slopes, dim ** -0.5)
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)
