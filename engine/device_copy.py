"""Host-to-device copies that do not wait for the GPU.

A copy from pageable host memory synchronises the stream first, so the host would stall until the
GPU has finished everything queued, including a step launched ahead (engine/llm_engine.py). These
helpers stage through pinned memory (torch's caching host allocator keeps each staging block alive
until its copy has run) and copy without blocking.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A tensor on `device`; host tensors go to a GPU through pinned memory without a stream sync."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def values_to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A list (or NumPy array) of host values as a `dtype` tensor on `device`, without a stream sync."""
    return to_device(torch.as_tensor(values, dtype=dtype), device)
