"""Capturing a CUDA graph the way every graph cache of the engine does it."""
from __future__ import annotations

from typing import Callable

import torch


def capture_graph(run: Callable, device, pool=None, warmups: int = 1):
    """Run `run` `warmups` times on a side stream (Triton compiles, cuBLAS/cuDNN pick their
    algorithms, the allocator settles), then capture one more call into a graph drawing on `pool`
    (a new pool when None). Returns (graph, what `run` returned during the capture, pool); share
    the pool among graphs that never run at the same time."""
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
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs, pool


class GraphStore:
    """Graphs keyed by input shape, sharing one memory pool (they never run at the same time)."""

    def __init__(self):
        self._graphs: dict = {}
        self._pool = None

    def reset(self) -> None:
        """Forget every graph (after weights or settings change)."""
        self._graphs, self._pool = {}, None

    @property
    def graph_count(self) -> int:
        return len(self._graphs)
