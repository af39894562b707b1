"""Channels-last row convolutions (kernels/flow_conv.py) and the channels-last GroupNorm + Mish:
the weight layouts against torch's Conv1d / ConvTranspose1d / Linear, the Triton kernel against the
reference under the interpreter (float32 / float16, ragged shapes, every fused option)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stepvox.kernels import flow_conv
from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.flow_conv import (LINEAR, UPSAMPLE_K4S2P1, conv_spec, conv_weight, linear_weight, row_conv,
                                       row_conv_reference, upsample_weight)
from stepvox.kernels.flow_fused import group_norm_mish_reference, group_norm_mish_rows

interp = pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1 (set by conftest)")


def _masks(n, length, cut):
    m = torch.ones(n, length)
    for i, c in enumerate(cut):
        m[i, c:] = 0
    return m


@pytest.mark.parametrize("stride", [1, 2])
def test_reference_conv_equals_torch_conv1d(stride):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 37, generator=g)                  # [N, C, L]
    w, b = torch.randn(9, 12, 3, generator=g), torch.randn(9, generator=g)
    m = _masks(2, 37, [37, 30])
    expect = F.conv1d(x * m[:, None], w, b, stride=stride, padding=1)
    got = row_conv_reference(x.transpose(1, 2), conv_weight(w), b, conv_spec(3, stride, 1), mask_in=m)
    torch.testing.assert_close(got.transpose(1, 2), expect, atol=1e-5, rtol=1e-5)


def test_reference_upsample_and_linear_equal_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 19, generator=g)
    w, b = torch.randn(12, 7, 4, generator=g), torch.randn(7, generator=g)
    expect = F.conv_transpose1d(x, w, b, stride=2, padding=1)
    got = row_conv_reference(x.transpose(1, 2), upsample_weight(w), b, UPSAMPLE_K4S2P1)
    assert got.shape == (2, 38, 7)
    torch.testing.assert_close(got.transpose(1, 2), expect, atol=1e-5, rtol=1e-5)
    lw, lb = torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    xr = x.transpose(1, 2)
    torch.testing.assert_close(row_conv_reference(xr, linear_weight(lw), lb), F.linear(xr, lw, lb),
                               atol=1e-5, rtol=1e-5)


CASES = {
    # name: (spec, taps-weight maker, K, Nout, options)
    "linear": (LINEAR, "linear", 80, 24, {}),
    "linear_ln_gelu": (LINEAR, "linear", 48, 72, {"ln": True, "gelu": True}),
    "linear_ln_nobias": (LINEAR, "linear", 32, 48, {"ln": True, "bias": False}),
    "linear_residual_maskout": (LINEAR, "linear", 40, 24, {"residual": True, "mask_out": True}),
    "conv3_stats": (conv_spec(3, 1, 1), "conv", 20, 32, {"mask_in": True, "stats": 8}),
    "conv3_stride2": (conv_spec(3, 2, 1), "conv", 24, 16, {"mask_in": True}),
    "upsample": (UPSAMPLE_K4S2P1, "up", 24, 16, {"mask_in": True}),
}


def _weights(kind, k, n_out, g, dtype):
    if kind == "linear":
        return linear_weight(torch.randn(n_out, k, generator=g) / k ** 0.5).to(dtype)
    if kind == "conv":
        return conv_weight(torch.randn(n_out, k, 3, generator=g) / (3 * k) ** 0.5).to(dtype)
    return upsample_weight(torch.randn(k, n_out, 4, generator=g) / (2 * k) ** 0.5).to(dtype)


SMALL_TILES = {"ln": (16, 16, None, 1, 1), "wide": (16, 16, 16, 1, 2), "narrow": (16, 16, 16, 1, 2),
               "conv": (16, 16, 16, 1, 2)}


def tiles_for(variant: str, n_out: int, ln: bool, taps: int):
    """The `tiles=` argument of row_conv for a tile variant. default_tiles: None, the tables' choice
    (TILES_SHORT on the test's short shapes); mid_tiles: TILES; small_tiles: many row / channel / K
    tiles with ragged edges on the test's small shapes; long_tiles: the long-sequence tiles (where the
    kind has some) at any length."""
    kind = flow_conv.tile_kind(n_out, ln, taps)
    if variant == "default_tiles":
        return None
    if variant == "mid_tiles":
        return flow_conv.TILES[kind]
    if variant == "small_tiles":
        return SMALL_TILES[kind]
    if variant == "long_tiles":
        return flow_conv.TILES_LONG[kind][1] if kind in flow_conv.TILES_LONG else flow_conv.TILES[kind]
    raise AssertionError(variant)


DTYPE_TILES = [(torch.float32, "default_tiles"), (torch.float16, "default_tiles"), (torch.float32, "mid_tiles"),
               (torch.float32, "small_tiles"), (torch.float32, "long_tiles")]


@interp
@pytest.mark.parametrize("dtype,tiles", DTYPE_TILES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["rows", "channels_first"])
def test_row_conv_kernel_matches_reference(case, dtype, layout, tiles):
    spec, kind, k, n_out, opt = CASES[case]
    g = torch.Generator().manual_seed(list(CASES).index(case))
    n, length = 2, 45
    xc = torch.randn(n, k, length, generator=g).to(dtype)
    x = xc.transpose(1, 2) if layout == "channels_first" else xc.transpose(1, 2).contiguous()
    w = _weights(kind, k, n_out, g, dtype)
    bias = None if opt.get("bias", True) is False else torch.randn(n_out, generator=g).to(dtype)
    l_out = spec.out_length(length)
    kw = {}
    if opt.get("mask_in"):
        kw["mask_in"] = _masks(n, length, [33, 45]).to(dtype)
    if opt.get("ln"):
        kw["ln"] = (torch.randn(k, generator=g).to(dtype), torch.randn(k, generator=g).to(dtype), 1e-5)
    if opt.get("gelu"):
        kw["gelu"] = True
    if opt.get("residual"):
        kw["residual"] = torch.randn(n, l_out, n_out, generator=g).to(dtype)
    if opt.get("mask_out"):
        kw["mask_out"], kw["mul_mask_out"] = _masks(n, l_out, [l_out, 20]).to(dtype), True
    ref = row_conv_reference(x, w, bias, spec, **kw)
    kw["tiles"] = tiles_for(tiles, n_out, "ln" in kw, spec.taps)
    if opt.get("stats"):
        mo = _masks(n, l_out, [33, 45]).to(dtype)
        got, stats = row_conv(x, w, bias, spec, mask_out=mo, gn_groups=opt["stats"], backend="triton", **kw)
        assert stats.partial is not None and stats.tiles >= 1
    else:
        got = row_conv(x, w, bias, spec, backend="triton", **kw)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(got, ref, **tol)
    if "mask_out" in kw:
        assert not got[1, 20:].any()


@interp
def test_row_conv_writes_into_a_channels_first_view():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 16, generator=g)
    w = linear_weight(torch.randn(10, 16, generator=g))
    m = _masks(2, 30, [30, 11])
    dest = torch.full((2, 10, 30), 7.0)
    row_conv(x, w, None, mask_out=m, mul_mask_out=True, out=dest.transpose(1, 2), backend="triton")
    expect = row_conv_reference(x, w, None, mask_out=m, mul_mask_out=True).transpose(1, 2)
    torch.testing.assert_close(dest, expect, atol=1e-5, rtol=1e-5)


@interp
@pytest.mark.parametrize("dtype,tiles", DTYPE_TILES)
@pytest.mark.parametrize("extra", ["none", "mask+temb", "mask+residual", "temb-shared"])
def test_conv_statistics_feed_group_norm_mish_rows(dtype, extra, tiles):
    """conv (+ partial statistics in its epilogue) then the channels-last apply = conv then the
    channel-first GroupNorm + Mish reference, masked frames excluded from the statistics."""
    g = torch.Generator().manual_seed(6)
    n, k, c, length, groups = 3, 12, 32, 70, 8
    x = torch.randn(n, length, k, generator=g).to(dtype)
    w = conv_weight(torch.randn(c, k, 3, generator=g) / 6).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    gw, gb = torch.randn(c, generator=g), torch.randn(c, generator=g)
    m = _masks(n, length, [50, 70, 7]).to(dtype) if "mask" in extra else None
    kw = {}
    if "temb" in extra:
        kw["temb"] = torch.randn(c if extra == "temb-shared" else n * c, generator=g).to(dtype)
        if extra != "temb-shared":
            kw["temb"] = kw["temb"].view(n, c)
    if "residual" in extra:
        kw["residual"] = torch.randn(n, length, c, generator=g).to(dtype)
    h, stats = row_conv(x, w, b, conv_spec(3, 1, 1), mask_in=m, mask_out=m, gn_groups=groups,
                        tiles=tiles_for(tiles, c, False, 3), backend="triton")
    got = group_norm_mish_rows(h, stats, gw, gb, 1e-5, mask=m, backend="triton", **kw)
    h_ref = row_conv_reference(x, w, b, conv_spec(3, 1, 1), mask_in=m)
    torch.testing.assert_close(h, h_ref, **(dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else {}))
    res = kw.get("residual")
    expect = group_norm_mish_reference(h.transpose(1, 2), gw, gb, groups, 1e-5,
                                       None if m is None else m[:, None], kw.get("temb"),
                                       None if res is None else res.transpose(1, 2)).transpose(1, 2)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(got, expect, **tol)
    if m is not None and "residual" not in extra:
        assert not got[2, 7:].any()


@interp
@pytest.mark.parametrize("dtype,tiles", DTYPE_TILES)
def test_statistics_of_the_leading_channels_only(dtype, tiles):
    """ResnetBlock1D's conv1 and res_conv as one product: statistics cover only the first half of the
    output channels, the apply reads that half as a strided view and adds the other half."""
    g = torch.Generator().manual_seed(7)
    n, k, c, length, groups = 2, 12, 32, 53, 8
    x = torch.randn(n, length, k, generator=g).to(dtype)
    w = conv_weight(torch.randn(2 * c, k, 3, generator=g) / 6).to(dtype)
    b = torch.randn(2 * c, generator=g).to(dtype)
    gw, gb = torch.randn(c, generator=g), torch.randn(c, generator=g)
    m = _masks(n, length, [40, 53]).to(dtype)
    both, stats = row_conv(x, w, b, conv_spec(3, 1, 1), mask_in=m, mask_out=m, gn_groups=groups,
                           stats_channels=c, tiles=tiles_for(tiles, 2 * c, False, 3), backend="triton")
    got = group_norm_mish_rows(both[:, :, :c], stats, gw, gb, 1e-5, mask=m, residual=both[:, :, c:],
                               backend="triton")
    assert stats.partial.numel() == n * groups * stats.tiles * 3
    ref_both = row_conv_reference(x, w, b, conv_spec(3, 1, 1), mask_in=m)
    expect = group_norm_mish_reference(ref_both[:, :, :c].transpose(1, 2), gw, gb, groups, 1e-5, m[:, None],
                                       None, ref_both[:, :, c:].transpose(1, 2)).transpose(1, 2)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(got, expect, **tol)
    with pytest.raises(ValueError, match="stats_channels"):
        row_conv(x, w, b, conv_spec(3, 1, 1), gn_groups=groups, stats_channels=c + 4)


@interp
def test_explicit_tiles_change_nothing_but_the_launch():
    """`tiles=` replaces the tables' choice and nothing else: the tables' own tiles passed explicitly
    give the bit-identical output of tiles=None, and a ragged small tile (many row / channel / K
    tiles, none of the shapes a multiple of 16) gives the reference's result."""
    g = torch.Generator().manual_seed(8)
    n, length, k, n_out = 2, 45, 40, 24
    x = torch.randn(n, length, k, generator=g)
    w = conv_weight(torch.randn(n_out, k, 3, generator=g) / (3 * k) ** 0.5)
    b = torch.randn(n_out, generator=g)
    m = _masks(n, length, [45, 29])
    spec = conv_spec(3, 1, 1)
    kind = flow_conv.tile_kind(n_out, False, spec.taps)
    assert kind == "conv"
    table = flow_conv.table_tiles(kind, spec.rows_per_phase(length))
    assert table == flow_conv.TILES_SHORT["conv"][0][1]                 # a short sequence: the short band
    default = row_conv(x, w, b, spec, mask_in=m, backend="triton")
    assert torch.equal(row_conv(x, w, b, spec, mask_in=m, tiles=table, backend="triton"), default)
    ref = row_conv_reference(x, w, b, spec, mask_in=m)
    for tiles in ((16, 16, 16, 1, 1), (16, 16, 16, 4, 2), (32, 16, 32, 2, 1)):
        got = row_conv(x, w, b, spec, mask_in=m, tiles=tiles, backend="triton")
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got, default, atol=2e-5, rtol=2e-5)
    # the tables' choice moves with the rows per sequence: short band, TILES, then TILES_LONG
    assert flow_conv.table_tiles("narrow", 384) == flow_conv.TILES_SHORT["narrow"][0][1]
    assert flow_conv.table_tiles("narrow", 385) == flow_conv.TILES["narrow"]
    assert flow_conv.table_tiles("narrow", 800) == flow_conv.TILES_LONG["narrow"][1]
    assert flow_conv.table_tiles("wide", 10 ** 5) == flow_conv.TILES["wide"]
    assert [flow_conv.tile_kind(512, False, 1), flow_conv.tile_kind(511, False, 1),
            flow_conv.tile_kind(8, True, 1), flow_conv.tile_kind(8, False, 3)] == ["wide", "narrow", "ln", "conv"]


@interp
def test_row_conv_backends_and_pdl_flag():
    """backend="reference" returns the reference (and GroupStats without partials, which
    group_norm_mish_rows then reduces itself); pdl=False is the same launch as pdl=True on CPU."""
    g = torch.Generator().manual_seed(9)
    n, length, k, c, groups = 2, 37, 12, 16, 4
    x = torch.randn(n, length, k, generator=g)
    w = conv_weight(torch.randn(c, k, 3, generator=g) / 6)
    b = torch.randn(c, generator=g)
    gw, gb = torch.randn(c, generator=g), torch.randn(c, generator=g)
    m = _masks(n, length, [37, 20])
    spec = conv_spec(3, 1, 1)
    h, stats = row_conv(x, w, b, spec, mask_in=m, mask_out=m, gn_groups=groups, backend="triton")
    h2, stats2 = row_conv(x, w, b, spec, mask_in=m, mask_out=m, gn_groups=groups, backend="triton", pdl=False)
    assert torch.equal(h2, h) and torch.equal(stats2.partial, stats.partial) and stats2.tiles == stats.tiles
    got = group_norm_mish_rows(h, stats, gw, gb, 1e-5, mask=m, backend="triton")
    assert torch.equal(group_norm_mish_rows(h, stats, gw, gb, 1e-5, mask=m, backend="triton", pdl=False), got)
    h_ref, stats_ref = row_conv(x, w, b, spec, mask_in=m, mask_out=m, gn_groups=groups, backend="reference")
    assert stats_ref.partial is None and stats_ref.groups == groups
    assert torch.equal(h_ref, row_conv_reference(x, w, b, spec, mask_in=m))
    torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=2e-5)
    # partials missing: the apply reduces the output itself, on either backend
    for backend in ("triton", "reference"):
        got_ref = group_norm_mish_rows(h_ref, stats_ref, gw, gb, 1e-5, mask=m, backend=backend)
        torch.testing.assert_close(got_ref, got, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="backend"):
        row_conv(x, w, b, spec, backend="cpu")
