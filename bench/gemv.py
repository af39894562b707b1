"""Skinny products of a decode step (M = 1..16 rows) on the TTS-3B weight shapes: stepvox's
Triton GEMV configurations (tiles, K splits) against torch (cuBLAS) F.linear, timed as CUDA-graph
replays of 20 back-to-back products (the default configuration also with PDL off).
Prints GB/s of weight bytes; JSON to $OUT/gemv.json.

  python bench/gemv.py
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _util import bench_graph, device_name, guarded, print_table, write_json

from stepvox.kernels.gemv import gemv_config, linear_small_m, linear_small_m_add_, rms_linear_small_m

SHAPES = {"qkv": (3584, 3072), "o_proj": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192),
          "lm_head": (74752, 3072)}
CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=st)
           for bn in (32, 64) for bk in (128, 256) for sk in (1, 3, 6) for st in (3, 5)]


CHAIN_VARIANTS = {
    "defaults": {},
    "small st3": {"small": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=3)},
    "small bk128 st4": {"small": dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=4)},
    "small bn16": {"small": dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=4)},
    "down split4": {"down": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=4, num_warps=4, num_stages=3)},
    "down nosplit st5": {"down": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=5)},
    "gate_up bk128 st4": {"gate_up": dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=4)},
    "down split8": {"down": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=8, num_warps=4, num_stages=3)},
    "down split8 st2": {"down": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=8, num_warps=4, num_stages=2)},
    "down split8 st4": {"down": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=8, num_warps=4, num_stages=4)},
    "down split16 st2": {"down": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=16, num_warps=4, num_stages=2)},
    "down bn16 split4": {"down": dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=4, num_warps=4, num_stages=3)},
    "down bn16 split8": {"down": dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=8, num_warps=4, num_stages=3)},
    "down bn64 split8": {"down": dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=8, num_warps=4, num_stages=3)},
    "down bk512 split8": {"down": dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=8, num_warps=8, num_stages=2)},
    "small split2": {"small": dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=2, num_warps=4, num_stages=3)},
    "small bn16 st3": {"small": dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=3)},
    "small bk512 st3": {"small": dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=8, num_stages=3)},
    "small bn16 bk512": {"small": dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3)},
    "defaults (repeat)": {},
}


def layer_chain(layers: int = 32, variants=("defaults",)) -> list[dict]:
    """The weight products of a whole batch-1 decode step (32 layers of qkv, o, gate|up, down,
    then the LM head; distinct weights per layer), replayed as one CUDA graph: the default
    configurations with PDL on and off, then other configurations (with PDL) if asked."""
    n_q, hid, inter, vocab = 3584, 3072, 8192, 74752
    ws = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
           for n, k in ((n_q, hid), (hid, hid), (2 * inter, hid), (hid, inter))] for _ in range(layers)]
    head = torch.randn(vocab, hid, device="cuda", dtype=torch.bfloat16) / hid ** 0.5
    x = torch.randn(1, hid, device="cuda", dtype=torch.bfloat16)
    xi = torch.randn(1, inter, device="cuda", dtype=torch.bfloat16)
    gb = (sum(w.numel() for layer in ws for w in layer) + head.numel()) * 2 / 1e9
    rows = []
    runs = [("defaults", True), ("defaults, no PDL", False)] + [(v, True) for v in variants if v != "defaults"]
    for tag, pdl in runs:
        over = CHAIN_VARIANTS.get(tag, {})

        def step(over=over, pdl=pdl):
            for wq, wo, wgu, wd in ws:
                linear_small_m(x, wq, config=over.get("small"), pdl=pdl)
                linear_small_m(x, wo, config=over.get("small"), pdl=pdl)
                linear_small_m(x, wgu, config=over.get("gate_up"), pdl=pdl)
                linear_small_m(xi, wd, config=over.get("down"), pdl=pdl)
            linear_small_m(x, head, pdl=pdl)
        t = bench_graph(step, iters=3, reps=10)
        rows.append(dict(variant=tag, ms=round(t, 3), gbs=round(gb / t * 1e3)))
        print(rows[-1], flush=True)
    return rows


def check_fused(eps: float = 1e-5) -> list[dict]:
    """The fused decode-step products in bf16 on the layer shapes against float64 formulas:
    normalised qkv, normalised gate|up with SiLU-and-mul, o_proj / down (split K) added to the residual."""
    rows = []
    hid, inter, n_q = 3072, 8192, 3584
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m in (1, 8, 16):
        res = torch.randn(m, hid, device="cuda", generator=gen).bfloat16()
        norm_w = (1 + 0.1 * torch.randn(hid, device="cuda", generator=gen)).bfloat16()
        normed = res.double() * torch.rsqrt(res.double().pow(2).mean(-1, keepdim=True) + eps) * norm_w.double()
        sumsq = res.float().pow(2).sum(1)[None, :]
        for name, n, silu in (("qkv", n_q, False), ("gate_up", 2 * inter, True)):
            w = (torch.randn(n, hid, device="cuda", generator=gen) / hid ** 0.5).bfloat16()
            got = rms_linear_small_m(res, (w.float() * norm_w.float()).bfloat16(), sumsq, eps, silu_and_mul=silu)
            want = normed @ w.double().T
            if silu:
                gate, up = want.chunk(2, dim=-1)
                want = F.silu(gate) * up
            err = ((got.double() - want).norm() / want.norm()).item()
            rows.append(dict(op=f"rms {name}", m=m, rel_err=err, ok=err < 1e-2))
        for name, n, k in (("o_proj", hid, hid), ("down", hid, inter)):
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
            r = res.clone()
            sq = linear_small_m_add_(x, w, r)
            want = res.double() + x.double() @ w.double().T
            err = ((r.double() - want).norm() / want.norm()).item()
            sq_want = r.double().pow(2).sum(1)
            sq_err = ((sq.sum(0).double() - sq_want).abs().max() / sq_want.max()).item()
            rows.append(dict(op=f"add {name}", m=m, rel_err=err, ok=err < 1e-2 and sq_err < 1e-5))
    for row in rows:
        print(row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain-only", action="store_true", help="only the whole-step chain, all variants")
    ap.add_argument("--check-fused", action="store_true", help="only the fused products' bf16 check")
    args = ap.parse_args()
    results = {"device": device_name(), "rows": []}
    if args.check_fused:
        results["check_fused"] = check_fused()
        write_json("gemv_check_fused.json", results)
        print("fused products:", "all ok" if all(r["ok"] for r in results["check_fused"]) else "FAILED")
        return
    if args.chain_only:
        results["chain"] = layer_chain(variants=tuple(CHAIN_VARIANTS))
        write_json("gemv_chain.json", results)
        return
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
            default = gemv_config(n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            t_nopdl = bench_graph(lambda: linear_small_m(x, nxt(), config=default, pdl=False))
            best = None
            sweep = [c for c in CONFIGS if c["SPLIT_K"] == 1 or n < 8192] if m == 1 else []
            for cfg in [default] + sweep:
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
                             default_no_pdl=f"{gb / t_nopdl * 1e3:.0f} GB/s",
                             best_cfg=",".join(f"{v}" for v in best[1].values())))
            print(rows[-1], flush=True)
            del ws
    results["table"] = rows
    results["chain"] = guarded(results, "chain", layer_chain)
    write_json("gemv.json", results)
    print(f"\ndevice: {results['device']}")
    print_table(rows, ["shape", "m", "torch", "stepvox", "default", "default_no_pdl", "best_cfg"])


if __name__ == "__main__":
    main()
