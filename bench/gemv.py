"""Skinny products of a decode step (M = 1..16 rows) on the TTS-3B weight shapes: stepvox's
Triton GEMV configurations against torch (cuBLAS) F.linear, timed as CUDA-graph replays.
Prints GB/s of weight bytes; JSON to $OUT/gemv.json.

  python bench/gemv.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import bench_graph, device_name, guarded, print_table, write_json  # noqa: E402

from stepvox.kernels.gemv import gemv_config, linear_small_m  # noqa: E402

SHAPES = {"qkv": (3584, 3072), "o_proj": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192),
          "lm_head": (74752, 3072)}
CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
           for bn in (16, 32, 64) for bk in (128, 256, 512) for w, st in ((4, 3), (4, 5), (8, 4))
           if not (bn == 64 and bk == 512)]


def main():
    results = {"device": device_name(), "rows": []}
    rows = []
    for m in (1, 8):
        for name, (n, k) in SHAPES.items():
            # several copies, used in turn, so that every product reads its weight from HBM (as the
            # 32 layers of the model do) instead of the 50 MB L2
            copies = max(2, -(-200_000_000 // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
            w = ws[0]
            turn = [0]

            def nxt():
                turn[0] = (turn[0] + 1) % copies
                return ws[turn[0]]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w)
            gb = n * k * 2 / 1e9
            t_torch = bench_graph(lambda: F.linear(x, nxt()))
            best = None
            for cfg in [gemv_config(n, k)] + CONFIGS:
                out = linear_small_m(x, w, config=cfg)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                if err > 2e-2:
                    results.setdefault("errors", {})[f"{name} m{m} {cfg}"] = f"rel err {err}"
                    continue
                t = guarded(results, f"{name} m{m} {cfg}", lambda cfg=cfg: bench_graph(
                    lambda: linear_small_m(x, nxt(), config=cfg)))
                if t is None:
                    continue
                results["rows"].append(dict(shape=name, m=m, cfg=cfg, ms=t, gbs=gb / t * 1e3))
                if best is None or t < best[0]:
                    best = (t, cfg)
            rows.append(dict(shape=f"{name} {n}x{k}", m=m, torch=f"{gb / t_torch * 1e3:.0f} GB/s ({t_torch * 1e3:.1f} us)",
                             stepvox=f"{gb / best[0] * 1e3:.0f} GB/s ({best[0] * 1e3:.1f} us)",
                             default=f"{[r['gbs'] for r in results['rows'] if r['shape'] == name and r['m'] == m][0]:.0f} GB/s",
                             best_cfg=",".join(f"{v}" for v in best[1].values())))
            print(rows[-1], flush=True)
            del ws
    results["table"] = rows
    write_json("gemv.json", results)
    print(f"\ndevice: {results['device']}")
    print_table(rows, ["shape", "m", "torch", "stepvox", "default", "best_cfg"])


if __name__ == "__main__":
    main()
