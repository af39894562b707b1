"""Tokenizer kernels (Triton under the interpreter on small shapes) against their references and
float64 brute force: fused SAN-M attention + FSMN, nearest-centroid search."""
from __future__ import annotations

import pytest
import torch

from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.nearest_centroid import nearest_centroid, nearest_centroid_reference
from stepvox.kernels.sanm import sanm_attention, sanm_attention_reference

needs_interpreter = pytest.mark.skipif(not (INTERPRETER_ACTIVE or torch.cuda.is_available()),
                                       reason="Triton needs the interpreter or a GPU")


def _sanm_f64(q, k, v, lb_k, lb_v, lb_len, n_rows, fw, heads, left):
    """Per-window loop in float64: attention over [valid look-back, valid own rows], FSMN as an
    explicit sum over taps."""
    w, r, d = q.shape
    dh = d // heads
    ctx = torch.zeros(w, r, d, dtype=torch.float64)
    mem = torch.zeros_like(ctx)
    for i in range(w):
        n, lb = int(n_rows[i]), int(lb_len[i])
        keys = torch.cat([lb_k[i, lb_k.shape[1] - lb:], k[i, :n]]).double()
        vals = torch.cat([lb_v[i, lb_v.shape[1] - lb:], v[i, :n]]).double()
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            p = torch.softmax(q[i, :, sl].double() @ keys[:, sl].T / dh ** 0.5, dim=-1)
            ctx[i, :, sl] = p @ vals[:, sl]
        vv = v[i].double().clone()
        vv[n:] = 0
        for t in range(r):
            acc = vv[t].clone()
            for j in range(fw.shape[1]):
                s = t + j - left
                if 0 <= s < r:
                    acc += fw[:, j].double() * vv[s]
            mem[i, t] = acc
    return ctx, mem


def _sanm_case(dtype, seed=0, w=4, r=9, d=64, heads=2, lb=16):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(w, r, 3 * d, generator=g).to(dtype)
    q, k, v = qkv.split(d, dim=-1)                        # strided views, as the encoder passes them
    lb_k = torch.randn(w, lb, d, generator=g).to(dtype)
    lb_v = torch.randn(w, lb, d, generator=g).to(dtype)
    lb_len = torch.tensor([0, 4, 12, 16][:w], dtype=torch.int32)
    n_rows = torch.tensor([9, 6, 8, 9][:w], dtype=torch.int32)
    fw = 0.2 * torch.randn(d, 11, generator=g)
    return q, k, v, lb_k, lb_v, lb_len, n_rows, fw, heads


@pytest.mark.parametrize("left", [5, 7])
def test_sanm_reference_matches_float64_loop(left):
    args = _sanm_case(torch.float32)
    ctx, mem = sanm_attention_reference(*args, left)
    ctx64, mem64 = _sanm_f64(*args, left)
    n_rows = args[6]
    for i in range(ctx.shape[0]):
        n = int(n_rows[i])
        torch.testing.assert_close(ctx[i, :n].double(), ctx64[i, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mem[i, :n].double(), mem64[i, :n], atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
def test_sanm_triton_matches_reference(dtype, tol):
    args = _sanm_case(dtype, seed=1)
    from stepvox.kernels import use_backend
    with use_backend("triton"):
        ctx, mem = sanm_attention(*args, 5)
    ctx_ref, mem_ref = sanm_attention_reference(*args, 5)
    n_rows = args[6]
    for i in range(ctx.shape[0]):
        n = int(n_rows[i])             # rows past n_rows are padding: their values are not used
        torch.testing.assert_close(ctx[i, :n].float(), ctx_ref[i, :n].float(), atol=tol, rtol=tol)
        torch.testing.assert_close(mem[i, :n].float(), mem_ref[i, :n].float(), atol=tol, rtol=tol)


def test_nearest_centroid_reference_is_euclidean_argmin():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 24, generator=g)
    e = torch.randn(70, 24, generator=g)
    assert nearest_centroid_reference(x, e).tolist() == torch.cdist(x.double(), e.double()).argmin(1).tolist()


@needs_interpreter
@pytest.mark.parametrize("n,k,d", [(37, 130, 48), (5, 64, 64), (64, 17, 100)])
def test_nearest_centroid_triton(n, k, d):
    from stepvox.kernels import use_backend
    g = torch.Generator().manual_seed(n)
    # small integers: every dot product is exact in float32, so ties are real ties
    x = torch.randint(-3, 4, (n, d), generator=g).float()
    e = torch.randint(-3, 4, (k, d), generator=g).float()
    e[k // 2] = e[k // 3]                                  # a duplicated entry: the lower index must win
    x[0] = e[k // 3]
    with use_backend("triton"):
        got = nearest_centroid(x, e)
        got_half = nearest_centroid(x.half(), e)            # low-precision features, fp32 search
    ref = nearest_centroid_reference(x, e)
    assert got.dtype == torch.long and got.tolist() == ref.tolist()
    assert int(got[0]) == min(k // 2, k // 3)
    assert got_half.tolist() == nearest_centroid_reference(x.half().float(), e).tolist()


def test_nearest_centroid_rejects_bad_shapes():
    with pytest.raises(ValueError):
        nearest_centroid(torch.zeros(3, 4), torch.zeros(5, 6))
