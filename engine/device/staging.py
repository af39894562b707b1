"""Host-to-device copies that never wait for the GPU.

A copy from pageable host memory synchronises the stream first, so the host would stall until the
GPU has finished everything queued, including a step launched ahead (engine/llm_engine.py). The
one-off helpers (`to_device`, `values_to_device`) stage through freshly pinned memory (torch's
caching host allocator keeps each block alive until its copy has run). `StagedInputs` serves the
per-step inputs of the model runner from fixed pinned buffers instead, since pinning fresh memory
every step is slow.
"""
from __future__ import annotations

import numpy as np
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


class StagedInputs:
    """A step's host values (token ids, slots, lengths, block tables) packed into a pinned host
    buffer per dtype and sent without blocking, either to device buffers of its own (`put`, eager
    steps: the step's tensors are views of them) or into given device tensors (`put_into`, the
    static inputs of a CUDA graph).

    Two host buffer sets are used by turns, each with an event recorded after its copy: refilling a
    set first waits for that event. It has normally passed (the engine reads a step's tokens before
    it stages the step after next), but a host running ahead (steps that sample nothing, prefill
    graphs launched in microseconds) must not overwrite a set whose copy is still queued. The device
    buffers need no turns: the next step's copy runs after this step's kernels in stream order. On a
    CPU device the buffers are plain memory: the same path runs, which is what the tests see."""

    def __init__(self, capacity: dict[torch.dtype, int], device: torch.device):
        """capacity: elements per dtype that one step may stage; larger steps copy directly."""
        self.device = device
        self.capacity = dict(capacity)
        pinned = device.type == "cuda"
        self.host = {dt: [torch.zeros(n, dtype=dt, pin_memory=pinned) for _ in range(2)]
                     for dt, n in capacity.items()}
        self.dev = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in capacity.items()}
        self.turn = 0
        self.copied = [torch.cuda.Event(), torch.cuda.Event()] if pinned else None   # per host set

    def _sent(self, turn: int) -> None:
        """The copies out of host set `turn` are queued: mark where they end on the stream."""
        if self.copied is not None:
            self.copied[turn].record(torch.cuda.current_stream(self.device))

    def _pack(self, arrays: list[np.ndarray], dtypes: list[torch.dtype]) -> list[torch.Tensor] | None:
        """Host views of `arrays` in this turn's buffers (None when they do not fit); flips the turn."""
        need: dict[torch.dtype, int] = {}
        for a, dt in zip(arrays, dtypes):
            need[dt] = need.get(dt, 0) + a.size
        if any(dt not in self.host or n > self.capacity[dt] for dt, n in need.items()):
            return None
        if self.copied is not None:
            self.copied[self.turn].synchronize()          # this set's last copy has been made
        views, offsets = [], dict.fromkeys(need, 0)
        for a, dt in zip(arrays, dtypes):
            start = offsets[dt]
            host = self.host[dt][self.turn][start:start + a.size]
            host.numpy()[:] = a.reshape(-1)
            views.append(host.view(a.shape))
            offsets[dt] = start + a.size
        self.turn ^= 1
        return views

    def put(self, parts: list[tuple[object, torch.dtype]]) -> list[torch.Tensor]:
        """Device tensors for (values, dtype) pairs; values are lists or NumPy arrays (1-D or 2-D).
        One non-blocking copy per dtype."""
        arrays = [np.asarray(v) for v, _ in parts]
        dtypes = [dt for _, dt in parts]
        hosts = self._pack(arrays, dtypes)
        if hosts is None:
            return [values_to_device(a, dt, self.device) for a, dt in zip(arrays, dtypes)]
        views, offsets, ends = [], {}, {}
        for a, dt in zip(arrays, dtypes):
            start = offsets.get(dt, 0)
            views.append(self.dev[dt][start:start + a.size].view(a.shape))
            offsets[dt] = ends[dt] = start + a.size
        turn = self.turn ^ 1                       # the set _pack just filled
        for dt, n in ends.items():
            self.dev[dt][:n].copy_(self.host[dt][turn][:n], non_blocking=True)
        self._sent(turn)
        return views

    def put_into(self, parts: list[tuple[np.ndarray, torch.Tensor]]) -> None:
        """Copy host arrays into given device tensors (any strides, same shapes), one non-blocking
        copy each."""
        arrays = [np.asarray(a) for a, _ in parts]
        hosts = self._pack(arrays, [dst.dtype for _, dst in parts])
        for a, (_, dst), host in zip(arrays, parts, hosts or [None] * len(parts)):
            dst.copy_(host if host is not None else values_to_device(a, dst.dtype, self.device), non_blocking=True)
        if hosts is not None:
            self._sent(self.turn ^ 1)
