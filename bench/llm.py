"""Step1 engine benchmark on one GPU, random weights in the TTS-3B shape (or --shape chat-layers).

Writes a released-format checkpoint (safetensors shards + index + tokenizer) to local disk, then:
load time; batch-1 decode ms/token with CUDA graphs on and off (and the bare graph replay);
prefill tokens/s at 400 and 4000 prompt tokens; throughput at batch 16 and 64 (400-token prompts,
256 new tokens). Prints a table last; JSON to $OUT/llm.json.

  python bench/llm.py [--layers N] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch
from _util import device_name, guarded, print_table, write_json
from safetensors.torch import save_file

from stepvox import LLM, SamplingParams
from stepvox.engine.config import TTS_3B, Step1Config
from stepvox.engine.models.step1_checkpoint import INDEX_FILE, expected_shapes
from stepvox.kernels.backend import num_sms
from stepvox.kernels.gemv import gemv_config
from stepvox.testing.step1 import build_tokenizer_model, config_dict


def write_checkpoint(folder: str, shape: dict, shard_bytes: int = 2 << 30) -> None:
    """Random bf16 weights made on the GPU (fast), saved in ~2 GB shards like a release."""
    os.makedirs(folder, exist_ok=True)
    raw = config_dict(**shape)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    cfg = Step1Config.from_dict(raw)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight_map, shard, size, n, total = {}, {}, 0, 1, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1
    for name, shp in expected_shapes(cfg).items():
        if "norm" in name:
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            scale = 1.0 if "embed" in name else shp[-1] ** -0.5
            t = (torch.randn(shp, device="cuda", generator=gen) * scale).to(torch.bfloat16).cpu()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    build_tokenizer_model(os.path.join(folder, "tokenizer.model"), cfg.vocab_size)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(5, 60000, (n - 1,), generator=g).tolist()


TTS_SAMPLING = dict(temperature=0.7, top_k=50, repetition_aware=True)   # the official TTS path (SPEC §7.4)


def decode_ms_per_token(llm, new_tokens: int = 256, sampling: dict | None = None, seed: int = 0,
                        outputs: list | None = None) -> float:
    """Median over 3 prompts of ms per generated token after the first (batch 1); greedy, or
    seeded sampling with `sampling`. The token ids go to `outputs` when given."""
    params = SamplingParams(**(sampling or dict(temperature=0)), seed=seed, max_tokens=new_tokens,
                            ignore_eos=True)
    times = []
    for rep in range(3):
        out = llm.generate([prompt_ids(32, rep)], params)[0]
        m = out.metrics
        times.append((m.finished_time - m.first_token_time) * 1e3 / (new_tokens - 1))
        if outputs is not None:
            outputs.append(out.outputs[0].token_ids)
    return statistics.median(times)


def graph_replay_ms(llm, size: int | None = None) -> float | None:
    """Mean over 50 back-to-back replays of the decode graph for `size` (default: the smallest)."""
    runner = llm.engine.executor.runner
    if not runner.graph_sizes:
        return None
    graph = runner.graphs.entry(size if size is not None else runner.graph_sizes[0])[0]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 50


def graph_launch_us(llm, size: int | None = None) -> float | None:
    """Median host time of one decode-graph launch call (all segments) on an idle GPU."""
    runner = llm.engine.executor.runner
    if not runner.graph_sizes:
        return None
    graph = runner.graphs.entry(size if size is not None else runner.graph_sizes[0])[0]
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def prefill_tokens_per_s(llm, n: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rates = []
    for rep in range(4):
        t0 = time.perf_counter()
        llm.generate([prompt_ids(n, 100 + rep)], params)   # distinct prompts: no prefix-cache hits
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def throughput(llm, batch: int, prompt_len: int = 400, new_tokens: int = 256) -> dict:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [prompt_ids(prompt_len, 1000 + batch * 10 + i) for i in range(batch)]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(seconds=dt, generated_tok_s=gen / dt, total_tok_s=(gen + batch * prompt_len) / dt)


def _first_difference(a: list, b: list) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def check_async(folder: str) -> dict:
    """Async scheduling against plain stepping inside one engine (the same graphs and weights):
    greedy and seeded TTS-style sampling, 3 prompts x 128 tokens, each mode twice; with the default
    GEMV tiles and with every GEMV unsplit (split-K products sum their K ranges in a fixed order, so
    both must repeat exactly)."""
    sms = num_sms(torch.device("cuda"))
    out = {}
    for label, tiles in (("default GEMV", None),
                         ("unsplit GEMV", lambda n, k: {**gemv_config(n, k, sms), "SPLIT_K": 1})):
        llm = LLM(folder, max_num_batched_tokens=4096, max_num_seqs=8, cuda_graph_max_batch=8,
                  gpu_memory_utilization=0.5, enable_prefix_caching=False, gemv_tiles=tiles)   # every run alike
        runs = []
        for mode in ("sync", "async", "sync", "async"):
            llm.engine.async_scheduling = mode == "async"
            toks = []
            for sampling in (dict(temperature=0), TTS_SAMPLING):
                params = SamplingParams(**sampling, seed=7, max_tokens=128, ignore_eos=True)
                toks.append([o.outputs[0].token_ids for o in llm.generate([prompt_ids(32, r) for r in range(3)],
                                                                           params)])
            runs.append((mode, toks))
        out[label] = dict(sync_repeat_equal=runs[0][1] == runs[2][1], async_repeat_equal=runs[1][1] == runs[3][1],
                          async_equals_sync=runs[0][1] == runs[1][1],
                          first_greedy_difference=_first_difference(runs[0][1][0][0], runs[1][1][0][0]))
        print(label, out[label], flush=True)
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return out


CONFIG_VARIANTS = {     # GEMV tiles for the fused step's products: (n, k) shape test -> overrides
    "defaults": (lambda n, k: False, {}),
    "qkv/o st5 (before)": (lambda n, k: n <= 8192 and k < 8192, dict(num_stages=5)),
    "gate_up st2": (lambda n, k: 8192 < n < 32768, dict(num_stages=2)),
    "down st2": (lambda n, k: k >= 8192, dict(num_stages=2)),
    "down split4 st4": (lambda n, k: k >= 8192, dict(SPLIT_K=4, num_stages=4)),
    "lm_head st6": (lambda n, k: n >= 32768, dict(num_stages=6)),
    "defaults again": (lambda n, k: False, {}),
}


def config_sweep(folder: str) -> list[dict]:
    """Batch-1 decode (CUDA graphs, async, fused step) per GEMV configuration variant, each on a
    fresh engine built with that variant's tiles (`gemv_tiles`)."""
    sms = num_sms(torch.device("cuda"))
    rows = []
    for tag, (applies, over) in CONFIG_VARIANTS.items():
        def tiles(n, k, applies=applies, over=over):
            return {**gemv_config(n, k, sms), **over} if applies(n, k) else None
        llm = LLM(folder, max_num_seqs=8, cuda_graph_max_batch=8, gpu_memory_utilization=0.5, gemv_tiles=tiles)
        rows.append(dict(variant=tag, decode_b1_ms=decode_ms_per_token(llm, new_tokens=128),
                         replay_ms=graph_replay_ms(llm)))
        print(rows[-1], flush=True)
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke runs)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-only", action="store_true",
                    help="batch-1 decode only: CUDA graphs with and without async scheduling and PDL, eager")
    ap.add_argument("--check-async", action="store_true",
                    help="only: async scheduling vs plain stepping, same engine, token equality")
    ap.add_argument("--runs", default=None,
                    help="comma-separated subset of the engine configurations to run (their table tags)")
    ap.add_argument("--config-sweep", action="store_true",
                    help="only: batch-1 decode for GEMV configuration variants (CONFIG_VARIANTS)")
    args = ap.parse_args()
    shape = dict(TTS_3B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    results = {"device": device_name(), "torch": torch.__version__, "shape": shape}
    folder = os.path.join(tempfile.gettempdir(), "stepvox-bench-tts3b")
    t0 = time.perf_counter()
    write_checkpoint(folder, shape)
    results["write_checkpoint_s"] = time.perf_counter() - t0
    print(f"checkpoint written in {results['write_checkpoint_s']:.1f} s", flush=True)
    if args.config_sweep:
        results["config_sweep"] = config_sweep(folder)
        write_json("llm_config_sweep.json", results)
        return
    if args.check_async:
        results["check_async"] = check_async(folder)
        write_json("llm_check_async.json", results)
        return
    rows = []
    runs = [("graphs", {}), ("eager", {"enforce_eager": True}), ("tp1-worker-path", {"distributed_executor": "mp"})]
    if args.decode_only:
        runs = [("graphs", {}), ("graphs-sync", {"async_scheduling": False}),
                ("graphs-unfused", {"fused_decode": False}), ("graphs-torch-sampler", {"triton_sampling": False}),
                ("graphs-no-pdl", {"pdl": False}), ("eager", {"enforce_eager": True})]
    if args.runs:
        runs = [(tag, opts) for tag, opts in runs if tag in args.runs.split(",")]
    tokens: dict[str, list] = {}
    for tag, opts in runs:
        graphs = tag == "graphs" and not args.decode_only
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm = LLM(folder, max_num_batched_tokens=4096, max_num_seqs=64, cuda_graph_max_batch=64,
                  gpu_memory_utilization=0.85, **opts)
        load = time.perf_counter() - t0
        runner = llm.engine.executor.runner
        r = results[tag] = dict(init_s=load, weights_s=runner.load_seconds,
                                graph_capture_s=getattr(runner, "graph_capture_seconds", 0.0),
                                kv_pages=runner.num_pages)
        print(f"{tag}: init {load:.1f} s (weights {runner.load_seconds:.1f} s)", flush=True)
        greedy, sampled = tokens.setdefault(f"{tag} greedy", []), tokens.setdefault(f"{tag} sampled", [])
        r["decode_b1_ms"] = guarded(results, f"{tag} decode", lambda: decode_ms_per_token(llm, outputs=greedy))
        print(f"{tag}: decode b1 {r['decode_b1_ms']} ms/token", flush=True)
        if tag in ("graphs", "graphs-sync", "graphs-unfused", "graphs-torch-sampler"):
            r["decode_b1_tts_sampling_ms"] = guarded(results, f"{tag} sampled decode", lambda: decode_ms_per_token(
                llm, sampling=TTS_SAMPLING, seed=7, outputs=sampled))
            print(f"{tag}: decode b1, TTS sampling {r['decode_b1_tts_sampling_ms']} ms/token", flush=True)
        if not opts.get("enforce_eager") and tag != "tp1-worker-path":
            r["graph_replay_b1_ms"] = guarded(results, f"{tag} replay", lambda: graph_replay_ms(llm))
            r["graph_launch_b1_us"] = guarded(results, f"{tag} launch", lambda: graph_launch_us(llm))
            print(f"{tag}: replay {r['graph_replay_b1_ms']} ms, launch call {r['graph_launch_b1_us']} us", flush=True)
        if tag == "tp1-worker-path":
            r["batch16"] = guarded(results, "worker batch 16", lambda: throughput(llm, 16))
        if graphs:
            for n in (400, 4000):
                r[f"prefill_{n}_tok_s"] = guarded(results, f"prefill {n}", lambda n=n: prefill_tokens_per_s(llm, n))
            for b in ((16,) if args.quick else (16, 64)):
                r[f"batch{b}"] = guarded(results, f"batch {b}", lambda b=b: throughput(llm, b))
                print(f"batch {b}: {r[f'batch{b}']}", flush=True)
        llm.shutdown()
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()
    if "graphs-sync" in results:         # async scheduling must not change a token
        results["async_equals_sync"] = dict(
            greedy=tokens["graphs greedy"] == tokens["graphs-sync greedy"],
            sampled=tokens["graphs sampled"] == tokens["graphs-sync sampled"] and bool(tokens["graphs sampled"]))
        print("async scheduling gives the same tokens:", results["async_equals_sync"], flush=True)
    if "eager" in results:               # eager steps tile attention by the batch's length, graphs by the longest
        results["eager_vs_graphs_greedy_agree"] = [   # context: rounding may differ, so report how far they agree
            len(a) if _first_difference(a, b) is None else _first_difference(a, b)
            for a, b in zip(tokens["eager greedy"], tokens["graphs greedy"])]
        print("eager vs graphs: greedy tokens agree for the first", results["eager_vs_graphs_greedy_agree"], flush=True)
    if "graphs-unfused" in results:      # bf16 rounding differs: report how long greedy decoding agrees
        results["fused_vs_unfused_greedy_agree"] = [
            len(a) if _first_difference(a, b) is None else _first_difference(a, b)
            for a, b in zip(tokens["graphs greedy"], tokens["graphs-unfused greedy"])]
        print("fused vs unfused: greedy tokens agree for the first", results["fused_vs_unfused_greedy_agree"],
              flush=True)
    g, e, w = results["graphs"], results.get("eager", {}), results.get("tp1-worker-path", {})

    def f(v, fmt="{:.2f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"
    if args.decode_only:
        rows = [dict(metric=f"{tag}: decode b1 ms/token | TTS sampling ms/token | replay ms | launch call us",
                     value=" | ".join(f(results[tag].get(k)) for k in ("decode_b1_ms", "decode_b1_tts_sampling_ms",
                                                                       "graph_replay_b1_ms", "graph_launch_b1_us")))
                for tag, _ in runs if tag in results]
        rows.append(dict(metric="async scheduling: same greedy / sampled tokens as without",
                         value=str(results.get("async_equals_sync"))))
        rows.append(dict(metric="eager vs graph steps: greedy tokens equal for the first (of 256, 3 prompts)",
                         value=str(results.get("eager_vs_graphs_greedy_agree"))))
        rows.append(dict(metric="fused vs unfused step: greedy tokens equal for the first (of 256, 3 prompts)",
                         value=str(results.get("fused_vs_unfused_greedy_agree"))))
        results["table"] = rows
        write_json("llm_decode.json", results)
        print(f"\ndevice: {results['device']}")
        print_table(rows, ["metric", "value"])
        return
    rows = [
        dict(metric="decode batch 1, CUDA graphs (ms/token)", value=f(g.get("decode_b1_ms"))),
        dict(metric="decode batch 1, eager (ms/token)", value=f(e.get("decode_b1_ms"))),
        dict(metric="graph replay alone, batch 1 (ms)", value=f(g.get("graph_replay_b1_ms"))),
        dict(metric="prefill 400 tokens (tokens/s)", value=f(g.get("prefill_400_tok_s"), "{:.0f}")),
        dict(metric="prefill 4000 tokens (tokens/s)", value=f(g.get("prefill_4000_tok_s"), "{:.0f}")),
    ]
    for b in (16, 64):
        t = g.get(f"batch{b}")
        if t:
            rows.append(dict(metric=f"batch {b}, 400+256 tokens: generated tokens/s", value=f(t["generated_tok_s"], "{:.0f}")))
    rows += [dict(metric="TP=1 worker path: decode batch 1 (ms/token)", value=f(w.get("decode_b1_ms"))),
             dict(metric="TP=1 worker path: batch 16 generated tokens/s",
                  value=f((w.get("batch16") or {}).get("generated_tok_s"), "{:.0f}"))]
    rows += [dict(metric="load: LLM() total / weights / graph capture (s)",
                  value=f"{g['init_s']:.1f} / {g['weights_s']:.1f} / {g['graph_capture_s']:.1f}"),
             dict(metric="checkpoint write (s)", value=f(results["write_checkpoint_s"], "{:.1f}"))]
    results["table"] = rows
    write_json("llm.json", results)
    if results.get("errors"):
        print("errors:", results["errors"])
    print(f"\ndevice: {results['device']}")
    print_table(rows, ["metric", "value"])


if __name__ == "__main__":
    main()
