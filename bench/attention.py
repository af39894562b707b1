"""Attention (and small-op) benchmark for stepvox.kernels on one GPU.

Checks correctness in bf16 against a float64 reference first, then times stepvox's kernels and
the peers available on the machine on the cases of issue 2:
  prefill (causal, batch 1): TTS shape 48 q / 4 kv heads, d 64, S = 8192 and 2048;
                             chat per TP=4 rank 24 q / 2 kv heads, d 128, S = 8192
  paged decode: TTS and chat-rank shapes at batch 64, context 8192; TTS at batch 1, context 2048
Peers: torch SDPA without bias (the ceiling), SDPA with an explicit bias tensor, FlexAttention with
a sqrt-ALiBi score_mod and a causal block mask. TF/s counts causal FLOPs 4*S^2/2*Hq*D; GB/s counts
the K and V bytes read once. Prints a table last and writes JSON to $OUT/attention.json.

  python bench/attention.py            # full run (H100: about 4 minutes)
  python bench/attention.py --quick    # fewer variants
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from _util import bench_gpu, bench_graph, device_name, guarded, print_table, write_json

from stepvox.kernels import (alibi_slopes, attention_decode, attention_prefill, rms_norm,
                             rms_norm_reference, silu_and_mul, silu_and_mul_reference, write_kv)
from stepvox.kernels.attention_decode import default_num_splits
from stepvox.kernels.attention_prefill import PREFILL_CONFIGS

DEV = "cuda"
DT = torch.bfloat16

PREFILL_CASES = [
    dict(case="prefill tts S=8192", hq=48, hkv=4, d=64, s=8192),
    dict(case="prefill tts S=2048", hq=48, hkv=4, d=64, s=2048),
    dict(case="prefill chat-rank S=8192", hq=24, hkv=2, d=128, s=8192),
]
DECODE_CASES = [
    dict(case="decode tts b64 L8192", hq=48, hkv=4, d=64, b=64, L=8192),
    dict(case="decode chat-rank b64 L8192", hq=24, hkv=2, d=128, b=64, L=8192),
    dict(case="decode tts b1 L2048", hq=48, hkv=4, d=64, b=1, L=2048),
]


# ---------------------------------------------------------------- float64 references (independent)
def ref_attention_f64(q, k, v, q_pos, k_pos, slopes, scale):
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    dist = (q_pos[:, None] - k_pos[None, :]).double()
    bias = -slopes.double()[:, None, None] * dist.clamp(min=0).sqrt()
    bias = bias.masked_fill(dist[None] < 0, float("-inf"))
    return torch.einsum("hqk,khd->qhd", (scores + bias).softmax(-1), v)


def paged_copy(kv, page, pages_total):
    """Scatter contiguous [L, H, D] rows into a shuffled paged cache; returns cache, table row."""
    length, heads, dim = kv.shape
    n = -(-length // page)
    table = torch.randperm(pages_total, device=kv.device)[:n].int()
    cache = torch.randn(pages_total, heads, page, dim, device=kv.device, dtype=kv.dtype)
    padded = torch.zeros(n * page, heads, dim, device=kv.device, dtype=kv.dtype)
    padded[:length] = kv
    cache[table.long()] = padded.view(n, page, heads, dim).permute(0, 2, 1, 3)
    return cache, table


def rel_err(out, ref):
    out = out.double()
    if torch.isnan(out).any():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def check_correctness(results):
    rows = []
    torch.manual_seed(1)
    for hq, hkv, d in [(48, 4, 64), (24, 2, 128), (8, 8, 64), (12, 4, 128)]:
        slopes = alibi_slopes(hq * 2)[:hq].to(DEV)
        scale = d ** -0.5
        for page in (16, 32):
            lens, ctxs = [1, 17, 130, 777], [0, 40, 0, 300]
            total = sum(lens)
            q = torch.randn(total, hq, d, device=DEV, dtype=DT)
            k = torch.randn(total, hkv, d, device=DEV, dtype=DT)
            v = torch.randn(total, hkv, d, device=DEV, dtype=DT)
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device=DEV, dtype=torch.int32)
            ctx_k = [torch.randn(c, hkv, d, device=DEV, dtype=DT) for c in ctxs]
            ctx_v = [torch.randn(c, hkv, d, device=DEV, dtype=DT) for c in ctxs]
            pages_total = 256
            kc = torch.randn(pages_total, hkv, page, d, device=DEV, dtype=DT)
            vc = torch.randn_like(kc)
            perm = torch.randperm(pages_total, device=DEV).int()
            table = torch.zeros(len(lens), 64, dtype=torch.int32, device=DEV)
            used = 0
            for b, c in enumerate(ctxs):
                n = -(-c // page)
                table[b, :n] = perm[used:used + n]
                for j in range(c):
                    kc[perm[used + j // page].long(), :, j % page] = ctx_k[b][j]
                    vc[perm[used + j // page].long(), :, j % page] = ctx_v[b][j]
                used += n
            out = torch.full_like(q, float("nan"))
            attention_prefill(q, k, v, cu, max(lens), slopes, scale, k_cache=kc, v_cache=vc, block_table=table,
                              context_lens=torch.tensor(ctxs, device=DEV, dtype=torch.int32), out=out)
            worst = 0.0
            for b, (n, c) in enumerate(zip(lens, ctxs)):
                lo = int(cu[b])
                kk = torch.cat([ctx_k[b], k[lo:lo + n]])
                vv = torch.cat([ctx_v[b], v[lo:lo + n]])
                ref = ref_attention_f64(q[lo:lo + n], kk, vv, torch.arange(c, c + n, device=DEV),
                                        torch.arange(c + n, device=DEV), slopes, scale)
                worst = max(worst, rel_err(out[lo:lo + n], ref))
            rows.append(dict(check=f"prefill+ctx hq{hq} hkv{hkv} d{d} page{page}", rel_err=f"{worst:.2e}",
                             ok=worst < 1e-2))
            # plain varlen prefill, no context
            out = torch.full_like(q, float("nan"))
            attention_prefill(q, k, v, cu, max(lens), slopes, scale, out=out)
            worst = 0.0
            for b, n in enumerate(lens):
                lo = int(cu[b])
                pos = torch.arange(n, device=DEV)
                ref = ref_attention_f64(q[lo:lo + n], k[lo:lo + n], v[lo:lo + n], pos, pos, slopes, scale)
                worst = max(worst, rel_err(out[lo:lo + n], ref))
            rows.append(dict(check=f"prefill hq{hq} hkv{hkv} d{d}", rel_err=f"{worst:.2e}", ok=worst < 1e-2))
            # decode
            seq_lens = [1, 33, 1000, 5000, 0]
            qd = torch.randn(len(seq_lens), hq, d, device=DEV, dtype=DT)
            kc = torch.randn(2048, hkv, page, d, device=DEV, dtype=DT)
            vc = torch.randn_like(kc)
            table = torch.stack([torch.randperm(2048, device=DEV)[:400] for _ in seq_lens]).int()
            for splits in (None, 1, 7):
                out = torch.full_like(qd, float("nan"))
                attention_decode(qd, kc, vc, table, torch.tensor(seq_lens, device=DEV, dtype=torch.int32), slopes,
                                 scale, num_splits=splits, out=out)
                worst = 0.0
                for b, length in enumerate(seq_lens):
                    if length == 0:
                        worst = max(worst, out[b].abs().max().item())
                        continue
                    n = -(-length // page)
                    kk = kc[table[b, :n].long()].permute(0, 2, 1, 3).reshape(-1, hkv, d)[:length]
                    vv = vc[table[b, :n].long()].permute(0, 2, 1, 3).reshape(-1, hkv, d)[:length]
                    pos = torch.arange(length, device=DEV)
                    ref = ref_attention_f64(qd[b:b + 1], kk, vv, pos[-1:], pos, slopes, scale)
                    worst = max(worst, rel_err(out[b:b + 1], ref))
                rows.append(dict(check=f"decode hq{hq} hkv{hkv} d{d} page{page} splits{splits}",
                                 rel_err=f"{worst:.2e}", ok=worst < 1e-2))
    results["correctness"] = rows
    return rows


# ---------------------------------------------------------------- prefill timings
def prefill_variants(d, quick, sweep=False):
    """The module's default first; then neighbours that show what each choice buys (the pointer
    path instead of TMA, the exact square root everywhere, other tiles). --sweep times the grid
    the defaults were chosen from."""
    base = dict(PREFILL_CONFIGS[d])
    if quick:
        return [base]
    if sweep:
        if d == 64:
            grid = [dict(BLOCK_M=bm, BLOCK_N=64, num_warps=4, num_stages=st, POLY_DIST=pd, POLY_DEGREE=deg, TMA=tma)
                    for bm in (64, 128) for st in (3, 4) for tma in (False, True) for pd, deg in ((192, 3), (384, 2))]
        else:
            grid = [dict(BLOCK_M=128, BLOCK_N=bn, num_warps=8, num_stages=st, POLY_DIST=3 * bn, POLY_DEGREE=3, TMA=tma)
                    for bn in (64, 128) for st in (2, 3, 4) for tma in (False, True)]
        return [base] + grid
    return [base, dict(base, TMA=False), dict(base, POLY_DIST=0),
            dict(base, BLOCK_M=128, num_warps=8 if d == 128 else 4)]


def time_prefill_case(c, quick, rows, results, no_peers: bool = False, sweep: bool = False):
    hq, hkv, d, s = c["hq"], c["hkv"], c["d"], c["s"]
    flops = 4 * s * s / 2 * hq * d
    torch.manual_seed(0)
    q = torch.randn(s, hq, d, device=DEV, dtype=DT)
    k = torch.randn(s, hkv, d, device=DEV, dtype=DT)
    v = torch.randn(s, hkv, d, device=DEV, dtype=DT)
    slopes = alibi_slopes(hq * (96 // hq) if hq < 48 else hq)[:hq].to(DEV)  # chat rank: rank 0's slice of 96
    cu = torch.tensor([0, s], device=DEV, dtype=torch.int32)
    scale = d ** -0.5
    entry = {"case": c["case"], "stepvox": {}, "peers": {}}

    def tf(ms):
        return flops / ms / 1e9

    best = None
    for cfg in prefill_variants(d, quick, sweep):
        name = "stepvox " + ",".join(f"{k_}={v_}" for k_, v_ in cfg.items())

        def run(cfg=cfg):
            return attention_prefill(q, k, v, cu, s, slopes, scale, config=cfg)
        ms = guarded(results, f"{c['case']} {name}", lambda: bench_gpu(run))
        if ms is None:
            continue
        entry["stepvox"][name] = dict(ms=ms, tflops=tf(ms))
        if best is None or ms < best[1]:
            best = (name, ms)
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    peers = {}
    if no_peers:
        return _record_prefill(c, entry, best, rows, results, tf)

    def sdpa_plain():
        return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
    peers["sdpa no bias (ceiling)"] = guarded(results, f"{c['case']} sdpa", lambda: bench_gpu(sdpa_plain))

    def bias_peer():
        kx = kb.repeat_interleave(hq // hkv, 1)
        vx = vb.repeat_interleave(hq // hkv, 1)
        pos = torch.arange(s, device=DEV, dtype=torch.float32)
        dist = pos[:, None] - pos[None, :]
        bias = (-slopes[:, None, None] * dist.clamp(min=0).sqrt()).masked_fill(dist < 0, float("-inf")).to(DT)[None]
        ms = bench_gpu(lambda: F.scaled_dot_product_attention(qb, kx, vx, attn_mask=bias, scale=scale))
        del bias
        return ms
    peers["sdpa + bias tensor"] = guarded(results, f"{c['case']} sdpa+bias", bias_peer)

    def flex_peer():
        flex = torch.compile(flex_attention, dynamic=False)

        def score_mod(score, b, h, q_idx, kv_idx):
            dist = (q_idx - kv_idx).clamp(min=0).to(torch.float32)
            return score - slopes[h] * torch.sqrt(dist)

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
        mask = create_block_mask(causal, 1, 1, s, s, device=DEV)
        return bench_gpu(lambda: flex(qb, kb, vb, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=True))
    peers["flexattention"] = guarded(results, f"{c['case']} flex", flex_peer)
    entry["peers"] = {k_: dict(ms=v_, tflops=tf(v_)) for k_, v_ in peers.items() if v_ is not None}
    _record_prefill(c, entry, best, rows, results, tf)


def _record_prefill(c, entry, best, rows, results, tf):
    results.setdefault("prefill", []).append(entry)
    bias_peers = [v_["ms"] for k_, v_ in entry["peers"].items() if "ceiling" not in k_]
    best_peer = min(bias_peers) if bias_peers else None
    if best:
        rows.append(dict(case=c["case"], stepvox=f"{tf(best[1]):.0f} TF/s", best_variant=best[0][8:],
                         ceiling=f"{entry['peers'].get('sdpa no bias (ceiling)', {}).get('tflops', 0):.0f} TF/s",
                         best_bias_peer=f"{tf(best_peer):.0f} TF/s" if best_peer else "-",
                         ratio=f"{best_peer / best[1]:.2f}x" if best_peer else "-"))


# ---------------------------------------------------------------- decode timings
def decode_variants(c, quick):
    """The module's defaults first, then a few neighbours (the sweep that chose them is in RESULTS.md)."""
    auto = default_num_splits(c["b"], c["hkv"], c["L"], torch.cuda.get_device_properties(0).multi_processor_count)
    base = [dict(num_splits=auto)]
    if quick:
        return base
    return base + [dict(num_splits=sp, block_n=bn, num_warps=w, num_stages=st)
                   for sp in sorted({auto, 2 * auto})
                   for bn, w, st in ((128, 4, 3), (256, 4, 2), (256, 8, 2), (128, 8, 3))]


def time_decode_case(c, quick, rows, results, copy_gbs, no_peers: bool = False):
    hq, hkv, d, b, L = c["hq"], c["hkv"], c["d"], c["b"], c["L"]
    page = 16
    pages_per_seq = L // page
    total_pages = b * pages_per_seq + 8
    torch.manual_seed(0)
    kc = torch.randn(total_pages, hkv, page, d, device=DEV, dtype=DT)
    vc = torch.randn_like(kc)
    table = torch.randperm(total_pages, device=DEV)[:b * pages_per_seq].view(b, pages_per_seq).int()
    seq_lens = torch.full((b,), L, device=DEV, dtype=torch.int32)
    q = torch.randn(b, hq, d, device=DEV, dtype=DT)
    slopes = alibi_slopes(hq).to(DEV)
    scale = d ** -0.5
    kv_bytes = 2 * b * L * hkv * d * 2
    entry = {"case": c["case"], "stepvox": {}, "peers": {}}
    best = None
    for cfg in decode_variants(c, quick):
        name = "stepvox " + ",".join(f"{k_}={v_}" for k_, v_ in cfg.items())

        def run(cfg=cfg):
            return attention_decode(q, kc, vc, table, seq_lens, slopes, scale, **cfg)
        ms = guarded(results, f"{c['case']} {name}", lambda: bench_gpu(run))
        if ms is None:
            continue
        entry["stepvox"][name] = dict(ms=ms, us=ms * 1e3, gbs=kv_bytes / ms / 1e6)
        if best is None or ms < best[1]:
            best = (name, ms, cfg)
    if best:
        cfg = best[2]
        graph_ms = guarded(results, f"{c['case']} graph", lambda: bench_graph(
            lambda: attention_decode(q, kc, vc, table, seq_lens, slopes, scale, **cfg)))
        entry["stepvox_best_graph_us"] = graph_ms * 1e3 if graph_ms else None
    if no_peers:
        results.setdefault("decode", []).append(entry)
        rows.append(dict(case=c["case"], stepvox=f"{kv_bytes / best[1] / 1e6:.0f} GB/s, {best[1] * 1e3:.1f} us",
                         graph_us=f"{entry.get('stepvox_best_graph_us') or 0:.1f}", best_variant=best[0][8:]))
        return
    # peers: SDPA on contiguous K/V (gathered beforehand, not timed)
    kcont = kc[table.long()].permute(0, 2, 1, 3, 4).reshape(b, hkv, L, d)
    vcont = vc[table.long()].permute(0, 2, 1, 3, 4).reshape(b, hkv, L, d)
    qb = q.unsqueeze(2)
    pos = torch.arange(L, device=DEV, dtype=torch.float32)
    bias = (-slopes[:, None, None] * (L - 1 - pos).sqrt()[None, None, :]).to(DT)[None].expand(b, hq, 1, L)
    peers = {}

    def sdpa_bias_expanded():
        kx, vx = kcont.repeat_interleave(hq // hkv, 1), vcont.repeat_interleave(hq // hkv, 1)
        return bench_gpu(lambda: F.scaled_dot_product_attention(qb, kx, vx, attn_mask=bias, scale=scale))
    peers["sdpa + bias (expanded kv)"] = guarded(results, f"{c['case']} sdpa+bias", sdpa_bias_expanded)
    peers["sdpa + bias (enable_gqa)"] = guarded(results, f"{c['case']} sdpa+bias gqa", lambda: bench_gpu(
        lambda: F.scaled_dot_product_attention(qb, kcont, vcont, attn_mask=bias, scale=scale, enable_gqa=True)))
    peers["sdpa no bias (enable_gqa)"] = guarded(results, f"{c['case']} sdpa", lambda: bench_gpu(
        lambda: F.scaled_dot_product_attention(qb, kcont, vcont, scale=scale, enable_gqa=True)))
    entry["peers"] = {k_: dict(ms=v_, us=v_ * 1e3, gbs=kv_bytes / v_ / 1e6) for k_, v_ in peers.items() if v_}
    results.setdefault("decode", []).append(entry)
    bias_peers = [v_["ms"] for k_, v_ in entry["peers"].items() if "no bias" not in k_]
    best_peer = min(bias_peers) if bias_peers else None
    if best:
        rows.append(dict(case=c["case"], stepvox=f"{kv_bytes / best[1] / 1e6:.0f} GB/s, {best[1] * 1e3:.1f} us",
                         graph_us=f"{entry.get('stepvox_best_graph_us') or 0:.1f}", best_variant=best[0][8:],
                         ceiling=f"copy {copy_gbs:.0f} GB/s",
                         best_bias_peer=f"{kv_bytes / best_peer / 1e6:.0f} GB/s, {best_peer * 1e3:.1f} us" if best_peer else "-",
                         ratio=f"{best_peer / best[1]:.2f}x" if best_peer else "-"))


# ---------------------------------------------------------------- small ops
def time_small_ops(rows, results):
    t, h, inter = 8192, 3072, 8192
    x = torch.randn(t, h, device=DEV, dtype=DT)
    res = torch.randn_like(x)
    w = torch.randn(h, device=DEV, dtype=DT)
    nbytes = 3 * x.numel() * 2 + x.numel() * 2  # read x, res; write res, out
    ours = bench_gpu(lambda: rms_norm(x, w, 1e-5, res))
    ref = bench_gpu(lambda: rms_norm_reference(x, w, 1e-5, res))
    rows.append(dict(case="rms_norm+residual 8192x3072", stepvox=f"{nbytes / ours / 1e6:.0f} GB/s",
                     best_bias_peer=f"torch {nbytes / ref / 1e6:.0f} GB/s", ratio=f"{ref / ours:.2f}x"))
    g = torch.randn(t, 2 * inter, device=DEV, dtype=DT)
    nbytes = g.numel() * 2 + t * inter * 2
    ours = bench_gpu(lambda: silu_and_mul(g))
    ref = bench_gpu(lambda: silu_and_mul_reference(g))
    rows.append(dict(case="silu_and_mul 8192x2x8192", stepvox=f"{nbytes / ours / 1e6:.0f} GB/s",
                     best_bias_peer=f"torch {nbytes / ref / 1e6:.0f} GB/s", ratio=f"{ref / ours:.2f}x"))
    kv = torch.randn(t, 4, 64, device=DEV, dtype=DT)
    kc = torch.empty(t // 16 * 2, 4, 16, 64, device=DEV, dtype=DT)
    vc = torch.empty_like(kc)
    slots = torch.randperm(kc.shape[0] * 16, device=DEV)[:t]
    ours = bench_gpu(lambda: write_kv(kv, kv, kc, vc, slots))
    nbytes = 4 * kv.numel() * 2
    rows.append(dict(case="write_kv 8192 tokens tts", stepvox=f"{nbytes / ours / 1e6:.0f} GB/s, {ours * 1e3:.1f} us"))
    results["small_ops"] = rows[-3:]


def copy_bandwidth():
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = bench_gpu(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["prefill", "decode", "correctness", "small"], default=None)
    ap.add_argument("--no-peers", action="store_true", help="time stepvox only (tuning runs)")
    ap.add_argument("--sweep", action="store_true", help="time the configuration grid the defaults came from")
    args = ap.parse_args()
    results = {"device": device_name(), "torch": torch.__version__}
    results["triton"] = triton.__version__
    print(f"device: {results['device']}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    if args.only in (None, "correctness"):
        corr = guarded(results, "correctness", lambda: check_correctness(results)) or []
        print_table(corr, ["check", "rel_err", "ok"])
        if not all(r["ok"] for r in corr):
            print("CORRECTNESS FAILURES", flush=True)
    copy_gbs = copy_bandwidth()
    results["copy_gbs"] = copy_gbs
    if args.only in (None, "prefill"):
        for c in PREFILL_CASES:
            guarded(results, c["case"], lambda c=c: time_prefill_case(c, args.quick, rows, results, args.no_peers,
                                                                      args.sweep))
            print(rows[-1] if rows else "", flush=True)
    if args.only in (None, "decode"):
        for c in DECODE_CASES:
            guarded(results, c["case"], lambda c=c: time_decode_case(c, args.quick, rows, results, copy_gbs,
                                                                     args.no_peers))
            print(rows[-1] if rows else "", flush=True)
    if args.only in (None, "small"):
        guarded(results, "small ops", lambda: time_small_ops(rows, results))
    results["table"] = rows
    write_json("attention.json", results)
    if results.get("errors"):
        print("errors:", *results["errors"].items(), sep="\n  ")
    print()
    print_table(rows, ["case", "stepvox", "graph_us", "best_variant", "ceiling", "best_bias_peer", "ratio"])


if __name__ == "__main__":
    main()
