"""CUDA graphs of the audio tokenizer's offline encoders (Paraformer windows + vq02 search; S3
encoder + vq06 search), one per input shape bucket, captured on first use.

Each graph computes `body(*static_inputs)` on fixed-size static buffers: a call copies its
(padded) inputs in, replays, and reads the static outputs. Lengths are rounded up to a bucket so
a few graphs serve all lengths: whole `unit`s up to 5 units, then steps of about x1.25 (rounded
to the unit), at most `cap`. Warm-up runs on a side stream before capture (Triton compiles,
cuBLAS/SDPA pick kernels); all graphs of one cache share a memory pool, so graphs of one cache
must not run concurrently (a lock serialises them; two caches may run on two streams).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..cuda_graphs import capture_graph


def bucket_length(n: int, unit: int, cap: int | None = None) -> int:
    """Smallest bucket >= n: unit, 2 unit, ... 5 unit, then ~x1.25 steps rounded up to the unit;
    `cap` (when n <= cap) is the last bucket."""
    if cap is not None and n > cap:
        raise ValueError(f"bucket_length: {n} is above the cap {cap}")
    b = unit
    while b < n:
        b = max(b + unit, -(-(b * 5) // (4 * unit)) * unit)
    return b if cap is None else min(b, cap)


def bucket_batch(n: int) -> int:
    """Batch buckets: powers of two."""
    return 1 << max(0, n - 1).bit_length()


class GraphCache:
    """Graphs of `body(key, *static_inputs)` keyed by the caller; `make_static(key)` builds
    neutral static inputs (any values the body can run on) for a key."""

    def __init__(self, body: Callable, make_static: Callable, device: torch.device):
        self.body = body
        self.make_static = make_static
        self.device = torch.device(device)
        self.lock = threading.Lock()
        self.entries: dict = {}
        self.pool = None

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, key):
        """(graph, static inputs, static outputs) of `key`, captured now if new. Call with the lock held."""
        if key not in self.entries:
            static = self.make_static(key)
            graph, outputs, self.pool = capture_graph(lambda: self.body(key, *static), self.device, self.pool,
                                                      warmups=2)
            self.entries[key] = (graph, static, outputs)
        return self.entries[key]

    def run(self, key, inputs):
        """Copy `inputs` into the static buffers of `key`, replay; returns the static outputs,
        valid until the next replay of this key (copy or consume them first). Lock held by caller."""
        graph, static, outputs = self.entry(key)
        for dst, src in zip(static, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return outputs
