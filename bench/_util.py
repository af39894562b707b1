"""Small helpers shared by the GPU benchmarks: output folder, timing, tables."""
from __future__ import annotations

import json
import os
import statistics
import time
import traceback

import torch


def out_dir() -> str:
    path = os.environ.get("OUT", "out")
    os.makedirs(path, exist_ok=True)
    return path


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_json(name: str, payload) -> str:
    path = os.path.join(out_dir(), name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def bench_gpu(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of fn() measured with CUDA events (triton.testing.do_bench)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_graph(fn, iters: int = 20, reps: int = 15) -> float:
    """Median ms per call of fn replayed `iters` times inside one CUDA graph (no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def bench_host(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median wall-clock ms of fn() including a final synchronize."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def guarded(results: dict, name: str, fn):
    """Run one section; record its exception instead of stopping the whole benchmark."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        return None


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
