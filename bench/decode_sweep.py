"""Steady-state decode step time of the engine by batch size (TTS-3B shape, one GPU): wall time
per engine step, the bare CUDA-graph replay, and the same with the GEMV kernels switched off
(cuBLAS for every product, unfused decode step). Prints a table; JSON to $OUT/decode_sweep.json.

  python bench/decode_sweep.py
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time

import torch
from _util import device_name, print_table, write_json
from llm import graph_replay_ms, prompt_ids, write_checkpoint

from stepvox import LLM, SamplingParams
from stepvox.engine.config import TTS_3B

BATCHES = [1, 4, 8, 16, 32, 64]


def step_ms(llm, batch):
    eng = llm.engine
    for i in range(batch):
        eng.add_request(prompt_ids(400, 7000 + i), SamplingParams(temperature=0, max_tokens=80, ignore_eos=True))
    while any(s.num_computed < s.num_prompt_tokens for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step(stream=False)
    for _ in range(5):
        eng.step(stream=False)
    times = []
    for _ in range(30):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step(stream=False)
        times.append((time.perf_counter() - t0) * 1e3)
    while eng.has_unfinished_requests():
        eng.step(stream=False)
    return statistics.median(times)


def profile_generate(llm, batch=16):
    """cProfile of one throughput-style generate() call: where does the host spend its time?"""
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    prompts = [prompt_ids(400, 9000 + i) for i in range(batch)]
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    llm.generate(prompts, params)
    pr.disable()
    dt = time.perf_counter() - t0
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(30)
    print(f"generate batch {batch} x (400 + 256): {dt:.2f} s, engine stats {llm.engine.stats}")
    print(buf.getvalue())
    return dt


def main():
    folder = os.path.join(tempfile.gettempdir(), "stepvox-bench-tts3b")
    if not os.path.isfile(os.path.join(folder, "tokenizer.model")):
        write_checkpoint(folder, dict(TTS_3B))
    results = {"device": device_name(), "rows": []}
    rows = []
    for gemv in (True, False):       # off: cuBLAS for every product (no GEMV, no fused decode step)
        llm = LLM(folder, max_num_batched_tokens=8192, max_num_seqs=64, cuda_graph_max_batch=64,
                  gpu_memory_utilization=0.85, gemv_max_rows=16 if gemv else 0, fused_decode=gemv)
        runner = llm.engine.executor.runner
        if gemv:
            results["generate16_s"] = profile_generate(llm)
        for b in BATCHES:
            r = dict(gemv=gemv, batch=b, step_ms=step_ms(llm, b), replay_ms=graph_replay_ms(llm, runner._graph_size(b)))
            results["rows"].append(r)
            rows.append({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()})
            print(rows[-1], flush=True)
        llm.shutdown()
        del llm, runner
        torch.cuda.empty_cache()
    write_json("decode_sweep.json", results)
    print(f"\ndevice: {results['device']}")
    print_table(rows, ["gemv", "batch", "step_ms", "replay_ms"])


if __name__ == "__main__":
    main()
