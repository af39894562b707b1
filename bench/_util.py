"""Small helpers shared by the GPU benchmarks: output folder, timing, statistics, tables, worker flags."""
from __future__ import annotations

import argparse
import json
import math
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


def percentile(values, q: float):
    """Linear interpolation between order statistics (numpy's default); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


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


def fmt(v, spec=".1f") -> str:
    """A number formatted for a table; "-" for None (a figure not measured)."""
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def parse_list(text: str, kind) -> list:
    """A comma-separated command-line list, e.g. "1,8,32" -> [1, 8, 32]."""
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args_or_work(ap: argparse.ArgumentParser, **workers):
    """The command line, or None after running a worker: a benchmark that runs part of itself in a
    subprocess starts this same script with a hidden `--NAME SPEC_PATH` flag, one per keyword
    (NAME_WITH_UNDERSCORES=function), and the function named is called with SPEC_PATH instead of the
    benchmark."""
    for name in workers:
        ap.add_argument(f"--{name.replace('_', '-')}", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name, work in workers.items():
        spec_path = getattr(args, name)
        if spec_path:
            work(spec_path)
            return None
    return args
