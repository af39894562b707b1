"""CUDA graphs: capture, keyed caches sharing one memory pool, and the length buckets that let a
few graphs serve all input sizes.

Every graph of the engine (the LM's decode steps, the audio tokenizer's encoders, the speech
decoder's pre-solve, ODE solve and vocoder) lives in a GraphCache: a graph per key computes
`body(key, *static_inputs)` on fixed buffers; a call copies its (padded) inputs in, replays, and
reads the static outputs, which stay valid until the next replay of that key. Graphs of one cache
share a memory pool, so they must not run at the same time: `lock` serialises callers from
different threads. Each cache captures on a stream of its own: cuBLAS keeps a workspace per
stream and a graph keeps the workspace it was captured with, so graphs captured on one stream
must not replay side by side (the audio tokenizer's S3 and Paraformer graphs, both captured on
torch's default capture stream and replayed overlapped, hung on released sizes; bench/RESULTS.md,
2026-12-06), while graphs of different caches (the LM engine's, the speech decoder's, the
tokenizer's, replayed from their own threads) may.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch


def capture_graph(run: Callable, device, pool=None, warmups: int = 1, stream: torch.cuda.Stream | None = None):
    """Run `run` `warmups` times on a side stream (Triton compiles, cuBLAS/cuDNN pick their
    algorithms, the allocator settles), then capture one more call into a graph drawing on `pool`
    (a new pool when None), on `stream` (default: torch's capture stream, shared by every caller
    that passes none: see the module docstring). Returns (graph, what `run` returned during the
    capture, pool)."""
    device = torch.device(device)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmups):
            run()
    current.wait_stream(side)
    if pool is None:
        pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads keep using the GPU during a capture (a pipeline's decoder thread
    # captures a new bucket while the LM engine's thread runs steps; "global" invalidates the capture)
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        outputs = run()
    return graph, outputs, pool


class GraphCache:
    """Graphs of `body(key, *static)` keyed by the caller; `make_static(key)` builds neutral static
    inputs (values the body can run on) for a key, as a tuple of tensors."""

    def __init__(self, body: Callable, make_static: Callable, device, warmups: int = 2):
        self.body = body
        self.make_static = make_static
        self.device = torch.device(device)
        self.warmups = warmups
        self.lock = threading.Lock()
        self.entries: dict = {}
        self.pool = None
        self.capture_stream: torch.cuda.Stream | None = None     # its own cuBLAS workspace (module docstring)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries

    def keys(self) -> list:
        return list(self.entries)

    def entry(self, key):
        """(graph, static inputs, static outputs) of `key`, captured now if new. Call with the lock held."""
        if key not in self.entries:
            # normal tensors, whatever mode the first caller is in: buffers made under inference_mode
            # could not be written by a later caller outside it (a pipeline captures under
            # inference_mode, a user then calls SpeechDecoder.stream outside it)
            if self.capture_stream is None:
                self.capture_stream = torch.cuda.Stream(self.device)
            with torch.inference_mode(False), torch.no_grad():
                static = self.make_static(key)
                graph, outputs, self.pool = capture_graph(lambda: self.body(key, *static), self.device, self.pool,
                                                          self.warmups, self.capture_stream)
            self.entries[key] = (graph, static, outputs)
        return self.entries[key]

    def run(self, key, inputs):
        """Copy `inputs` (tensors shaped like the static inputs, in order) into the static buffers of
        `key` and replay; returns the static outputs. Call with the lock held."""
        graph, static, outputs = self.entry(key)
        for dst, src in zip(static, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return outputs

    def reset(self) -> None:
        """Forget every graph (after weights or settings change)."""
        self.entries, self.pool = {}, None


def bucket_length(n: int, unit: int, cap: int | None = None, geometric_after: int | None = None) -> int:
    """Smallest bucket >= n: multiples of `unit`; with `geometric_after`, multiples only up to that
    many units, then steps of about x1.25 (rounded up to the unit). `cap` (when n <= cap) is the last
    bucket; n above it is refused."""
    if cap is not None and n > cap:
        raise ValueError(f"bucket_length: {n} is above the cap {cap}")
    if geometric_after is None:
        b = max(1, -(-n // unit)) * unit
    else:
        b = unit
        while b < n:
            b = b + unit if b < geometric_after * unit else max(b + unit, -(-(b * 5) // (4 * unit)) * unit)
    return b if cap is None else min(b, cap)


def bucket_batch(n: int) -> int:
    """Batch buckets: powers of two."""
    return 1 << max(0, n - 1).bit_length()
