"""Staging of an eager step's host inputs (token ids, slots, lengths, block tables) for the GPU.

Each step packs its values into a pinned host buffer per dtype and sends each buffer in one
non-blocking copy to a device buffer; the step's tensors are views of that device buffer. A plain
copy from pageable memory would synchronise the stream (the host would wait for a step launched
ahead), and pinning fresh memory every step is slow. Two host buffer sets are used by turns: the
engine reads a step's tokens, which come after that step's copies on the stream, before it stages
the step after next, so the host never refills a set that a queued copy still reads. The device
buffers need no turns: the next step's copy runs after this step's kernels in stream order.
"""
from __future__ import annotations

import numpy as np
import torch

from .device_copy import values_to_device


class StagedInputs:
    def __init__(self, capacity: dict[torch.dtype, int], device: torch.device):
        """capacity: elements per dtype that one step may stage; larger steps copy directly. On a
        CPU device the buffers are plain memory: the same path runs, which is what the tests see."""
        self.device = device
        self.capacity = dict(capacity)
        pinned = device.type == "cuda"
        self.host = {dt: [torch.zeros(n, dtype=dt, pin_memory=pinned) for _ in range(2)]
                     for dt, n in capacity.items()}
        self.dev = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in capacity.items()}
        self.turn = 0

    def put(self, parts: list[tuple[object, torch.dtype]]) -> list[torch.Tensor]:
        """Device tensors for (values, dtype) pairs; values are lists or NumPy arrays (1-D or 2-D)."""
        arrays = [np.asarray(v) for v, _ in parts]
        need: dict[torch.dtype, int] = {}
        for a, (_, dt) in zip(arrays, parts):
            need[dt] = need.get(dt, 0) + a.size
        if any(n > self.capacity.get(dt, 0) for dt, n in need.items()):
            return [values_to_device(a, dt, self.device) for a, (_, dt) in zip(arrays, parts)]
        views, offsets = [], dict.fromkeys(need, 0)
        for a, (_, dt) in zip(arrays, parts):
            start = offsets[dt]
            self.host[dt][self.turn].numpy()[start:start + a.size] = a.reshape(-1)
            views.append(self.dev[dt][start:start + a.size].view(a.shape))
            offsets[dt] = start + a.size
        for dt, n in need.items():
            self.dev[dt][:n].copy_(self.host[dt][self.turn][:n], non_blocking=True)
        self.turn ^= 1
        return views
