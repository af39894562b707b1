"""Fused SAN-M attention + FSMN of the Paraformer encoder (kernels/sanm.py): the reference against a
float64 loop, and the Triton kernels (under the interpreter on small shapes) against the reference."""
from __future__ import annotations

import pytest
import torch

from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.sanm import (sanm_attention, sanm_attention_indexed, sanm_attention_indexed_reference,
                                  sanm_attention_reference)

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
    ctx, mem = sanm_attention(*args, 5, backend="triton")
    ctx_ref, mem_ref = sanm_attention_reference(*args, 5)
    n_rows = args[6]
    for i in range(ctx.shape[0]):
        n = int(n_rows[i])             # rows past n_rows are padding: their values are not used
        torch.testing.assert_close(ctx[i, :n].float(), ctx_ref[i, :n].float(), atol=tol, rtol=tol)
        torch.testing.assert_close(mem[i, :n].float(), mem_ref[i, :n].float(), atol=tol, rtol=tol)


@needs_interpreter
def test_sanm_indexed_reads_look_back_in_place():
    """The indexed kernel (look-back rows read from the batch's own k, v) equals the kernel on
    gathered copies, and the reference."""
    q, k, v, _, _, lb_len, n_rows, fw, heads = _sanm_case(torch.float32, seed=4)
    w, r, d = q.shape
    g = torch.Generator().manual_seed(9)
    index = torch.randint(0, w * r, (w, 16), generator=g)
    ctx, mem = sanm_attention_indexed(q, k, v, index, lb_len, n_rows, fw, heads, 5, backend="triton")
    ctx_g, mem_g = sanm_attention(q, k, v, k.reshape(-1, d)[index], v.reshape(-1, d)[index], lb_len, n_rows,
                                  fw, heads, 5, backend="triton")
    ctx_r, mem_r = sanm_attention_indexed_reference(q, k, v, index, lb_len, n_rows, fw, heads, 5)
    for i in range(w):
        n = int(n_rows[i])
        assert torch.equal(ctx[i, :n], ctx_g[i, :n]) and torch.equal(mem[i, :n], mem_g[i, :n])
        torch.testing.assert_close(ctx[i, :n], ctx_r[i, :n], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(mem[i, :n], mem_r[i, :n], atol=2e-5, rtol=2e-5)


def test_sanm_reference_backend_is_the_reference():
    """backend="reference" runs the plain-PyTorch functions (no interpreter needed); an unknown
    backend is refused."""
    args = _sanm_case(torch.float32, seed=2)
    ctx, mem = sanm_attention(*args, 5, backend="reference")
    ctx_r, mem_r = sanm_attention_reference(*args, 5)
    assert torch.equal(ctx, ctx_r) and torch.equal(mem, mem_r)
    q, k, v, _, _, lb_len, n_rows, fw, heads = args
    index = torch.randint(0, q.shape[0] * q.shape[1], (q.shape[0], 16), generator=torch.Generator().manual_seed(3))
    ctx_i, mem_i = sanm_attention_indexed(q, k, v, index, lb_len, n_rows, fw, heads, 5, backend="reference")
    ctx_ir, mem_ir = sanm_attention_indexed_reference(q, k, v, index, lb_len, n_rows, fw, heads, 5)
    assert torch.equal(ctx_i, ctx_ir) and torch.equal(mem_i, mem_ir)
    with pytest.raises(ValueError, match="backend"):
        sanm_attention(*args, 5, backend="numpy")
