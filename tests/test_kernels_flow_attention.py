"""Self-attention of the flow estimator (kernels/flow_attention.py) against a float64 formula, under
the Triton interpreter (small shapes)."""
from __future__ import annotations

import pytest
import torch

from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.flow_attention import ATTENTION_TILES, attention_tile, flow_attention, flow_attention_reference

pytestmark = pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1 (set by conftest)")


def _attention_f64(qkv, heads, key_mask):
    """softmax(q k^T / sqrt(D)) v per head in float64, padded keys left out (written from the
    formula, independent of the kernel's reference)."""
    n, length, width = qkv.shape
    d = width // (3 * heads)
    x = qkv.double().view(n, length, 3, heads, d)
    out = torch.empty(n, length, heads * d, dtype=torch.float64)
    for b in range(n):
        keep = torch.ones(length, dtype=torch.bool) if key_mask is None else key_mask[b] != 0
        for h in range(heads):
            q, k, v = x[b, :, 0, h], x[b, keep, 1, h], x[b, keep, 2, h]
            out[b, :, h * d:(h + 1) * d] = torch.softmax(q @ k.T / d ** 0.5, -1) @ v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,head_dim,length,masked", [(2, 8, 37, True), (3, 16, 90, False), (2, 64, 70, True)])
def test_flow_attention_matches_formula(dtype, heads, head_dim, length, masked):
    g = torch.Generator().manual_seed(4)
    n = 2
    qkv = (torch.randn(n, length, 3 * heads * head_dim, generator=g) * 1.5).to(dtype)
    key_mask = None
    if masked:
        key_mask = torch.ones(n, length, dtype=dtype)
        key_mask[1, length - 23:] = 0
        qkv[1, length - 23:] = 1e4 * torch.rand(23, qkv.shape[2], generator=g).to(dtype)   # never attended to
    expect = _attention_f64(qkv, heads, key_mask)
    out = torch.full((n, length, heads * head_dim), float("nan"), dtype=dtype)
    flow_attention(qkv, heads, key_mask, out=out, backend="triton")
    assert not torch.isnan(out).any()
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.double(), expect, atol=tol, rtol=tol)
    # the reference (SDPA on views) computes the same function
    torch.testing.assert_close(flow_attention_reference(qkv.float(), heads, key_mask).double(), expect,
                               atol=1e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_flow_attention_rejects_bad_shapes():
    qkv = torch.randn(2, 10, 3 * 2 * 8)
    with pytest.raises(ValueError, match="width"):
        flow_attention(qkv, 5)
    with pytest.raises(ValueError, match="key_mask"):
        flow_attention(qkv, 2, torch.ones(2, 9))


@pytest.mark.parametrize("tile", [(16, 16, 1), (32, 16, 4), (16, 64, 2)])
def test_flow_attention_explicit_tile(tile):
    """`tile=` (BLOCK_M, BLOCK_N, warps) changes only the launch: ragged query and key tiles over a
    37-frame sequence with padded keys give the formula's result."""
    g = torch.Generator().manual_seed(6)
    n, heads, head_dim, length = 2, 2, 16, 37
    qkv = torch.randn(n, length, 3 * heads * head_dim, generator=g)
    key_mask = torch.ones(n, length)
    key_mask[0, 30:] = 0
    qkv[0, 30:] = 1e4                                             # never attended to
    expect = _attention_f64(qkv, heads, key_mask)
    got = flow_attention(qkv, heads, key_mask, tile=tile, backend="triton")
    torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=1e-5)
    default = flow_attention(qkv, heads, key_mask, backend="triton")
    torch.testing.assert_close(got, default, atol=1e-5, rtol=1e-5)
    assert attention_tile(length) == ATTENTION_TILES[-1][1]
    assert torch.equal(flow_attention(qkv, heads, key_mask, tile=attention_tile(length), backend="triton"), default)


def test_flow_attention_backends_and_pdl_flag():
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(1, 20, 3 * 2 * 8, generator=g)
    key_mask = torch.ones(1, 20, dtype=torch.int32)
    key_mask[0, 15:] = 0
    got = flow_attention(qkv, 2, key_mask, backend="triton")
    assert torch.equal(flow_attention(qkv, 2, key_mask, backend="triton", pdl=False), got)
    out = torch.full((1, 20, 16), float("nan"))
    ref = flow_attention(qkv, 2, key_mask, out=out, backend="reference")
    assert ref is out and torch.equal(ref, flow_attention_reference(qkv, 2, key_mask))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        flow_attention(qkv, 2, backend="sdpa")
