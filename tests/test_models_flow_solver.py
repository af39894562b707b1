"""The Euler solver's schedule (engine/models/flow_solver.py)."""
from __future__ import annotations

import torch

from stepvox.engine.models.flow_solver import euler_schedule


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
