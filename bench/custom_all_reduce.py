"""The custom all-reduce (stepvox._C, csrc/custom_all_reduce.cu) alone on one GPU: latency per
message size, and the fused all-reduce + residual add + RMSNorm at decode shapes.

One card cannot show the real thing (each rank on its own GPU, peers read over NVLink), and NCCL
refuses ranks that share a GPU, so there is no NCCL column. Here every rank is a stream of this one
process (ranks exchange plain device addresses: one process cannot open its own IPC handles), and a
CUDA graph launches all ranks' kernels side by side: the figure is the kernels' synchronisation and
summing cost with every peer read served by this card's HBM, and each rank's grid is capped so that
all ranks' blocks are co-resident (the barriers spin until every rank's block arrives). Before timing,
each size is checked against a float64 sum and for identical bits on every rank.

    python bench/custom_all_reduce.py                  # needs stepvox._C built (README)
    python bench/custom_all_reduce.py --worlds 2,4 --sizes 1024,65536
JSON to $OUT/custom_all_reduce.json.
"""
from __future__ import annotations

import argparse

import torch
from _util import bench_graph, device_name, print_table, write_json

from stepvox.engine.distributed import custom_all_reduce as car

SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
CAPACITY = 64 << 20
FUSED_SHAPES = [(1, 3072), (16, 3072), (1, 12288), (16, 12288)]     # decode rows x hidden: TTS-3B, 130B


class StreamRanks:
    """`world` ranks of one process on one GPU, each with its own region, stream and grid cap."""

    def __init__(self, world: int, capacity: int):
        ops = torch.ops.stepvox
        self.world, self.ops = world, ops
        self.handles = [ops.car_init(r, world, capacity) for r in range(world)]
        addresses = torch.tensor([ops.car_region_address(h) for h in self.handles], dtype=torch.long)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        self.max_blocks = max(1, min(64, sms // world))        # one 512-thread block per SM always fits
        for h in self.handles:
            ops.car_set_peer_addresses(h, addresses)
            ops.car_set_max_blocks(h, self.max_blocks)
        self.streams = [torch.cuda.Stream() for _ in self.handles]

    def launch(self, fn) -> None:
        """fn(rank, handle) on every rank's stream, forked from and joined to the current stream."""
        here = torch.cuda.current_stream()
        for r, (h, s) in enumerate(zip(self.handles, self.streams)):
            s.wait_stream(here)
            with torch.cuda.stream(s):
                fn(r, h)
        for s in self.streams:
            here.wait_stream(s)

    def close(self) -> None:
        torch.cuda.synchronize()
        for h in self.handles:
            self.ops.car_dispose(h)


def graph_us(ranks: StreamRanks, fn) -> float:
    """Median microseconds of one call of fn on every rank, replayed in a graph of 20 calls."""
    return bench_graph(lambda: ranks.launch(fn)) * 1000


def run_all_reduce(world: int, sizes: list[int], dtype: torch.dtype) -> list[dict]:
    ranks = StreamRanks(world, CAPACITY)
    rows = []
    try:
        for nbytes in sizes:
            n = nbytes // torch.tensor([], dtype=dtype).element_size()
            gen = torch.Generator().manual_seed(nbytes + world)
            parts = [torch.randn(n, generator=gen).to(dtype) for _ in range(world)]
            want = torch.stack([p.double() for p in parts]).sum(0)
            xs = [p.cuda() for p in parts]
            outs = [torch.empty_like(x) for x in xs]
            way = car.route(xs[0], CAPACITY, car.DEFAULT_ONE_SHOT_MAX)
            two_shot = way == "two_shot"
            ranks.launch(lambda r, h: ranks.ops.car_all_reduce(h, xs[r], outs[r], two_shot))
            torch.cuda.synchronize()
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7
            exact = all(torch.equal(outs[0], o) for o in outs[1:])
            err = float(((outs[0].double().cpu() - want).abs() / (want.abs() + 1e-3)).max())
            ok = exact and bool(torch.allclose(outs[0].double().cpu(), want, rtol=tol, atol=tol))
            us = graph_us(ranks, lambda r, h: ranks.ops.car_all_reduce(h, xs[r], outs[r], two_shot))
            rows.append(dict(world=world, dtype=str(dtype).split(".")[-1], bytes=nbytes, algorithm=way,
                             max_blocks=ranks.max_blocks, us=round(us, 2), algbw_gbs=round(nbytes / us / 1e3, 2),
                             identical_on_ranks=exact, max_rel_err=err, ok=ok))
            print(rows[-1], flush=True)
    finally:
        ranks.close()
    return rows


def run_fused(world: int, dtype: torch.dtype) -> list[dict]:
    ranks = StreamRanks(world, CAPACITY)
    rows = []
    try:
        for m, hidden in FUSED_SHAPES:
            gen = torch.Generator().manual_seed(m * hidden + world)
            parts = [torch.randn(m, hidden, generator=gen).to(dtype) for _ in range(world)]
            base = torch.randn(m, hidden, generator=gen).to(dtype)
            weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
            xs = [p.cuda() for p in parts]
            residuals = [base.cuda() for _ in range(world)]
            outs = [torch.empty_like(x) for x in xs]
            w = weight.cuda()
            fused = (lambda r, h: ranks.ops.car_all_reduce_add_rms_norm(h, xs[r], residuals[r], w, 1e-5, outs[r]))
            ranks.launch(fused)
            torch.cuda.synchronize()
            total = torch.stack([p.float() for p in parts]).sum(0).to(dtype)
            new = (total.float() + base.float()).to(dtype).double()
            want = new / torch.sqrt((new ** 2).mean(-1, keepdim=True) + 1e-5) * weight.double()
            tol = 1e-4 if dtype == torch.float32 else 2 ** -6
            ok = (all(torch.equal(outs[0], o) for o in outs[1:])
                  and bool(torch.allclose(residuals[0].double().cpu(), new, rtol=tol, atol=tol))
                  and bool(torch.allclose(outs[0].double().cpu(), want, rtol=tol, atol=tol)))
            us = graph_us(ranks, fused)      # residuals grow with every replay; only the time is read here
            rows.append(dict(world=world, dtype=str(dtype).split(".")[-1], rows=m, hidden=hidden,
                             max_blocks=ranks.max_blocks, us=round(us, 2), ok=ok))
            print(rows[-1], flush=True)
    finally:
        ranks.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="message bytes")
    args = ap.parse_args()
    reason = car.load()
    if reason is not None:
        raise SystemExit(reason)
    worlds = [int(w) for w in args.worlds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    res = {"device": device_name(), "torch": torch.__version__, "capacity": CAPACITY,
           "one_shot_max": car.DEFAULT_ONE_SHOT_MAX, "all_reduce": [], "fused": []}
    for world in worlds:
        for dtype in (torch.bfloat16, torch.float32):
            res["all_reduce"] += run_all_reduce(world, sizes, dtype)
            write_json("custom_all_reduce.json", res)
        res["fused"] += run_fused(world, torch.bfloat16)
        write_json("custom_all_reduce.json", res)
    print_table(res["all_reduce"], ["world", "dtype", "bytes", "algorithm", "max_blocks", "us", "algbw_gbs", "ok"])
    print_table(res["fused"], ["world", "dtype", "rows", "hidden", "max_blocks", "us", "ok"])
    if not all(r["ok"] for r in res["all_reduce"] + res["fused"]):
        raise SystemExit("a custom all-reduce result was wrong (see ok)")


if __name__ == "__main__":
    main()
