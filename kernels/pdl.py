"""Programmatic dependent launch (PDL, Hopper and newer) for the kernels of a decode step.

A decode step at batch 1 is a chain of ~260 short kernels; between two of them the GPU drains one
grid and ramps up the next. Launched with PDL, a kernel's programs may be scheduled while the
kernel before it is still finishing: they run their prologue (a GEMV starts streaming its weights,
which no earlier kernel writes), then block in `griddepcontrol.wait` until the previous grid has
completed and its writes are visible. Every kernel launched this way must therefore wait before
it reads anything the kernel before it wrote or writes anything an earlier kernel reads; most
kernels here wait at the top, before any such access. Waiting is transitive: a kernel's programs
can only start once every program of the kernel before has started and waited (or left without
touching memory; in every kernel here some programs wait), so whatever was written two or more
kernels back, or before the step, is complete by then. The
decode attention (block tables, cached keys) and the residual-adding GEMV (the residual rows) read
such data before their wait. A kernel launched without PDL after one with it waits as usual.

Each such kernel takes `pdl` (default True): False launches it plainly and the wait compiles away
(benchmarks compare both in one process).
"""
from __future__ import annotations

import torch

_CAPABLE: dict[int, bool] = {}


def pdl_enabled(t: torch.Tensor, wanted: bool = True) -> bool:
    """Whether kernels working on `t` launch with PDL: wanted, and a CUDA tensor on compute
    capability >= 9."""
    if not wanted or not t.is_cuda:
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    capable = _CAPABLE.get(index)
    if capable is None:
        capable = _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return capable


def pdl_launch_options(t: torch.Tensor, wanted: bool = True) -> dict:
    """Keyword arguments for launching a kernel that takes a `USE_PDL` constexpr (and waits in
    `gdc_wait` when it is set): the constexpr, plus Triton's `launch_pdl` when PDL is on."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl_enabled(t, wanted) else {"USE_PDL": False}
