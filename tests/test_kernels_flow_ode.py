"""The classifier-free-guidance Euler step of the flow ODE (kernels/flow_ode.py) against its
reference (the eager roundings, bit for bit) under the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

from stepvox.kernels.backend import INTERPRETER_ACTIVE
from stepvox.kernels.flow_ode import cfg_euler_step, cfg_euler_step_reference

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
    out = cfg_euler_step(v, x, mask, dt, 0.7, next_input=nxt, backend="triton")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)           # same roundings, bit for bit
    torch.testing.assert_close(nxt[:b, :c], out, atol=0, rtol=0)
    torch.testing.assert_close(nxt[b:, :c], out, atol=0, rtol=0)
    assert not nxt[:, c:].any()
    # masked frames do not move; the math is x + dt((1+w) vc - w vu)
    assert torch.equal(out[1, :, 30:], x[1, :, 30:])
    manual = x.double() + dt * (1.7 * v[:b].double() - 0.7 * v[b:].double()) * mask.double()
    torch.testing.assert_close(out.double(), manual, atol=2e-2 if dtype == torch.float16 else 1e-5, rtol=1e-2)
    inplace = cfg_euler_step(v, x.clone(), mask, dt, 0.7, out=None, backend="triton")
    torch.testing.assert_close(inplace, ref, atol=0, rtol=0)


def test_cfg_euler_step_backends_and_pdl_flag():
    g = torch.Generator().manual_seed(1)
    b, c, length = 1, 4, 33
    v = torch.randn(2 * b, c, length, generator=g)
    x = torch.randn(b, c, length, generator=g)
    mask = torch.ones(b, 1, length)
    mask[0, :, 25:] = 0
    ref = cfg_euler_step_reference(v, x, mask, 0.125, 0.7)
    got = cfg_euler_step(v, x, mask, 0.125, 0.7, backend="triton")
    assert torch.equal(got, ref)
    assert torch.equal(cfg_euler_step(v, x, mask, 0.125, 0.7, backend="triton", pdl=False), got)
    nxt = torch.zeros(2 * b, c, length)
    assert torch.equal(cfg_euler_step(v, x, mask, 0.125, 0.7, next_input=nxt, backend="reference"), ref)
    assert torch.equal(nxt[:b], ref) and torch.equal(nxt[b:], ref)
    with pytest.raises(ValueError, match="backend"):
        cfg_euler_step(v, x, mask, 0.125, 0.7, backend="euler")
