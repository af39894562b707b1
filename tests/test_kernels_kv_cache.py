"""KV write into the paged cache (kernels/kv_cache.py; Triton under the interpreter) against the
slot definition."""
import pytest
import torch

from stepvox.kernels import write_kv, write_kv_reference


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


def test_write_kv_backends_agree():
    """backend="reference" writes the same cache as the kernel; an unknown backend is refused."""
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(9, 2, 32, generator=gen)
    v = torch.randn(9, 2, 32, generator=gen)
    slots = torch.tensor([3, -1, 40, 41, 0, 17, -1, 63, 8])
    caches = []
    for backend in ("triton", "reference"):
        kc, vc = torch.zeros(4, 2, 16, 32), torch.zeros(4, 2, 16, 32)
        write_kv(k, v, kc, vc, slots, backend=backend)
        caches.append((kc, vc))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    kc, vc = torch.zeros(4, 2, 16, 32), torch.zeros(4, 2, 16, 32)
    write_kv_reference(k, v, kc, vc, slots)
    assert torch.equal(kc, caches[0][0]) and torch.equal(vc, caches[0][1])
    with pytest.raises(ValueError, match="backend"):
        write_kv(k, v, kc, vc, slots, backend="Triton")


def test_write_kv_rejects_mismatched_shapes():
    cache = torch.zeros(4, 2, 16, 64)
    with pytest.raises(ValueError):
        write_kv(torch.zeros(3, 4, 64), torch.zeros(3, 4, 64), cache, cache.clone(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        write_kv(torch.zeros(3, 2, 64), torch.zeros(3, 2, 64), cache, cache.clone(), torch.zeros(2, dtype=torch.long))
