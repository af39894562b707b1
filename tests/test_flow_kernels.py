"""Fused flow/vocoder kernels against their references, under the Triton interpreter (small shapes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stepvox.kernels.backend import INTERPRETER_ACTIVE, use_backend
from stepvox.kernels.flow_fused import (add_layer_norm, add_layer_norm_reference, group_norm_mish,
                                        group_norm_mish_reference)
from stepvox.kernels.flow_ode import cfg_euler_step, cfg_euler_step_reference
from stepvox.kernels.snake import snake, snake_reference
from stepvox.engine.models.flow_solver import bucket_length, euler_schedule

pytestmark = pytest.mark.skipif(not INTERPRETER_ACTIVE, reason="needs TRITON_INTERPRET=1 (set by conftest)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cfg_euler_step_matches_eager_rounding(dtype):
    g = torch.Generator().manual_seed(0)
    b, c, length = 2, 5, 45
    v = torch.randn(2 * b, c, length, generator=g).to(dtype)
    x = torch.randn(b, c, length, generator=g).to(dtype)
    mask = torch.ones(b, 1, length, dtype=dtype)
    mask[1, :, 30:] = 0
    dt = float(torch.tensor(0.0371, dtype=dtype))
    ref = cfg_euler_step_reference(v, x, mask, dt, 0.7)
    nxt = torch.zeros(2 * b, c + 3, length, dtype=dtype)
    with use_backend("triton"):
        out = cfg_euler_step(v, x, mask, dt, 0.7, next_input=nxt)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)           # same roundings, bit for bit
    torch.testing.assert_close(nxt[:b, :c], out, atol=0, rtol=0)
    torch.testing.assert_close(nxt[b:, :c], out, atol=0, rtol=0)
    assert not nxt[:, c:].any()
    # masked frames do not move; the math is x + dt((1+w) vc - w vu)
    assert torch.equal(out[1, :, 30:], x[1, :, 30:])
    manual = x.double() + dt * (1.7 * v[:b].double() - 0.7 * v[b:].double()) * mask.double()
    torch.testing.assert_close(out.double(), manual, atol=2e-2 if dtype == torch.float16 else 1e-5, rtol=1e-2)
    with use_backend("triton"):
        inplace = cfg_euler_step(v, x.clone(), mask, dt, 0.7, out=None)
    torch.testing.assert_close(inplace, ref, atol=0, rtol=0)


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
    with use_backend("triton"):
        out = group_norm_mish(x, w, b, 4, 1e-5, **kw)
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
    with use_backend("triton"):
        out = group_norm_mish(padded, w, b, 2, 1e-5, mask=mask)
    torch.testing.assert_close(out[..., :40], plain, atol=1e-5, rtol=1e-5)
    assert not out[..., 40:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_layer_norm(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 48, generator=g).to(dtype)
    r = torch.randn(2, 9, 48, generator=g).to(dtype)
    w, b = torch.randn(48, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    y_ref, r_ref = add_layer_norm_reference(x, r, w, b, 1e-5)
    with use_backend("triton"):
        y, r_new = add_layer_norm(x, r, w, b, 1e-5)
    torch.testing.assert_close(r_new, r_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}))


def test_snake():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 333, generator=g) * 3
    alpha = torch.rand(6, generator=g) + 0.2
    with use_backend("triton"):
        out = snake(x, alpha)
    torch.testing.assert_close(out, snake_reference(x, alpha), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out, x + torch.sin(alpha[None, :, None] * x) ** 2 / alpha[None, :, None])


def test_euler_schedule_rounds_like_the_official_loop():
    for dtype in (torch.float32, torch.bfloat16):
        span = 1 - torch.cos(torch.linspace(0, 1, 11, dtype=dtype) * 0.5 * torch.pi)
        t, dt, expect = span[0], span[1] - span[0], []
        for step in range(1, 11):
            expect.append((t.item(), dt.item()))
            t = t + dt
            if step < 10:
                dt = span[step + 1] - t
        got = [(a.item(), b.item()) for a, b in euler_schedule(10, "cosine", dtype)]
        assert got == expect
        assert all(a.dtype == dtype for a, _ in euler_schedule(10, "cosine", dtype))
    lin = euler_schedule(4, "linear", torch.float32)
    assert [round(t.item(), 6) for t, _ in lin] == [0.0, 0.25, 0.5, 0.75]


def test_bucket_length():
    assert [bucket_length(n, 32) for n in (1, 32, 33, 861)] == [32, 32, 64, 864]


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
    from stepvox.kernels.flow_attention import flow_attention, flow_attention_reference
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
    with use_backend("triton"):
        flow_attention(qkv, heads, key_mask, out=out)
    assert not torch.isnan(out).any()
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out.double(), expect, atol=tol, rtol=tol)
    # the reference (SDPA on views) computes the same function
    torch.testing.assert_close(flow_attention_reference(qkv.float(), heads, key_mask).double(), expect,
                               atol=1e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_flow_attention_rejects_bad_shapes():
    from stepvox.kernels.flow_attention import flow_attention
    qkv = torch.randn(2, 10, 3 * 2 * 8)
    with pytest.raises(ValueError, match="width"):
        flow_attention(qkv, 5)
    with pytest.raises(ValueError, match="key_mask"):
        flow_attention(qkv, 2, torch.ones(2, 9))
