"""Fused elementwise chains of the flow estimator (kernels/flow_fused.py: GroupNorm + Mish, channel
first and channels last, and add + LayerNorm) against their references, under the Triton
interpreter (small shapes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.flow_conv import GroupStats, conv_spec, conv_weight, row_conv
from stepvox.kernels.flow_fused import (GN_ROWS_ELEMENTS, add_layer_norm, add_layer_norm_reference, group_norm_mish,
                                        group_norm_mish_reference, group_norm_mish_rows,
                                        group_norm_mish_rows_reference)

pytestmark = pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1 (set by conftest)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("extra", ["none", "mask", "mask+temb", "mask+residual", "temb-shared"])
def test_group_norm_mish(dtype, extra):
    g = torch.Generator().manual_seed(1)
    n, c, length = 3, 16, 70
    x = (torch.randn(n, c, length, generator=g) * 2 + 0.5).to(dtype)
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    kw = {}
    if "mask" in extra:
        m = torch.ones(n, 1, length)
        m[0, :, 50:] = 0
        m[2, :, 7:] = 0
        kw["mask"] = m.to(dtype)
    if "temb" in extra:
        kw["temb"] = torch.randn(c if extra == "temb-shared" else n * c, generator=g).to(dtype)
        if extra != "temb-shared":
            kw["temb"] = kw["temb"].view(n, c)
    if "residual" in extra:
        kw["residual"] = torch.randn(n, c, length, generator=g).to(dtype)
    ref = group_norm_mish_reference(x, w, b, 4, 1e-5, **kw)
    out = group_norm_mish(x, w, b, 4, 1e-5, backend="triton", **kw)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, ref, **tol)


def test_group_norm_masked_statistics_ignore_padding():
    """A padded row normalises exactly like the unpadded one (statistics over valid frames)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 8, 40, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    padded = torch.cat([x, 100 * torch.randn(1, 8, 24, generator=g)], dim=2)
    mask = torch.cat([torch.ones(1, 1, 40), torch.zeros(1, 1, 24)], dim=2)
    plain = F.mish(F.group_norm(x, 2, w, b, 1e-5))
    out = group_norm_mish(padded, w, b, 2, 1e-5, mask=mask, backend="triton")
    torch.testing.assert_close(out[..., :40], plain, atol=1e-5, rtol=1e-5)
    assert not out[..., 40:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_layer_norm(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 48, generator=g).to(dtype)
    r = torch.randn(2, 9, 48, generator=g).to(dtype)
    w, b = torch.randn(48, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    y_ref, r_ref = add_layer_norm_reference(x, r, w, b, 1e-5)
    y, r_new = add_layer_norm(x, r, w, b, 1e-5, backend="triton")
    torch.testing.assert_close(r_new, r_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}))


def test_fused_reference_backends():
    """backend="reference" runs the plain-PyTorch chains; an unknown backend is refused."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 30, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    m = torch.ones(2, 1, 30)
    m[1, :, 20:] = 0
    assert torch.equal(group_norm_mish(x, w, b, 2, 1e-5, mask=m, backend="reference"),
                       group_norm_mish_reference(x, w, b, 2, 1e-5, mask=m))
    xr, r = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    lw, lb = torch.randn(40, generator=g), torch.randn(40, generator=g)
    y, r_new = add_layer_norm(xr, r, lw, lb, 1e-5, backend="reference")
    y_ref, r_ref = add_layer_norm_reference(xr, r, lw, lb, 1e-5)
    assert torch.equal(y, y_ref) and torch.equal(r_new, r_ref)
    with pytest.raises(ValueError, match="backend"):
        group_norm_mish(x, w, b, 2, 1e-5, backend="refrence")
    with pytest.raises(ValueError, match="backend"):
        add_layer_norm(xr, r, lw, lb, 1e-5, backend="")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_group_norm_mish_rows_block_elements(dtype):
    """`block_elements` (rows x channels per program of the channels-last apply) changes only the
    launch: from one row per program (fewer elements than channels), through a count that is not a
    power-of-two number of rows (7 x C: rounded down to 4 rows), to the whole sequence in one, with a
    ragged last row tile, the output is bit-identical and equals the reference."""
    g = torch.Generator().manual_seed(6)
    n, k, c, length, groups = 2, 12, 32, 45, 8
    x = torch.randn(n, length, k, generator=g).to(dtype)
    w = conv_weight(torch.randn(c, k, 3, generator=g) / 6).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    gw, gb = torch.randn(c, generator=g), torch.randn(c, generator=g)
    m = torch.ones(n, length, dtype=dtype)
    m[1, 31:] = 0
    temb = torch.randn(n, c, generator=g).to(dtype)
    residual = torch.randn(n, length, c, generator=g).to(dtype)
    h, stats = row_conv(x, w, b, conv_spec(3, 1, 1), mask_in=m, mask_out=m, gn_groups=groups, backend="triton")
    expect = group_norm_mish_rows_reference(h, gw, gb, groups, 1e-5, m, temb, residual)
    outs = []
    for elements in (16, 7 * c, GN_ROWS_ELEMENTS, 64 * c):
        outs.append(group_norm_mish_rows(h, stats, gw, gb, 1e-5, mask=m, temb=temb, residual=residual,
                                         backend="triton", block_elements=elements))
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    for out in outs:
        assert torch.equal(out, outs[0])
        torch.testing.assert_close(out, expect, **tol)
    # without partial statistics (the reference row_conv) the apply reduces the output itself
    torch.testing.assert_close(group_norm_mish_rows(h, GroupStats(None, 0, groups), gw, gb, 1e-5, mask=m, temb=temb,
                                                    residual=residual, backend="triton", block_elements=16),
                               expect, atol=0, rtol=0)
    with pytest.raises(ValueError, match="block_elements"):
        group_norm_mish_rows(h, stats, gw, gb, 1e-5, mask=m, backend="triton", block_elements=0)
