"""Where a decode step's time goes (one GPU): torch.profiler over eager and CUDA-graph decode steps
of the Step1 engine at batch 1, random TTS-3B-shape weights. Prints the top host ops and device
kernels; the Chrome traces go to $OUT.

  python bench/profile_step.py [--layers N]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from _util import out_dir
from llm import TTS_SAMPLING, prompt_ids, write_checkpoint

from stepvox import LLM, SamplingParams
from stepvox.engine.config import TTS_3B


def profile_decode(llm, tag, steps=20, sampling: dict | None = None):
    engine = llm.engine
    engine.add_request(prompt_ids(64, 5), SamplingParams(**(sampling or dict(temperature=0)), seed=3,
                                                         max_tokens=steps + 30, ignore_eos=True))
    for _ in range(10):
        engine.step()                      # prefill + warm decode steps
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    prof.export_chrome_trace(os.path.join(out_dir(), f"trace_{tag}.json"))
    if tag == "eager":
        print(f"\n===== {tag}: host ops (self CPU), {steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(f"\n===== {tag}: device kernels")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--graphs-only", action="store_true")
    ap.add_argument("--unfused-too", action="store_true", help="also profile graphs with the unfused decode step")
    ap.add_argument("--tts-sampling-too", action="store_true",
                    help="also profile graphs with the TTS sampling settings (bench/llm.py TTS_SAMPLING)")
    args = ap.parse_args()
    shape = dict(TTS_3B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    folder = os.path.join(tempfile.gettempdir(), "stepvox-bench-tts3b")
    if not os.path.isfile(os.path.join(folder, "tokenizer.model")):
        write_checkpoint(folder, shape)
    runs = [("graphs", False, True)] if args.graphs_only else [("eager", True, True), ("graphs", False, True)]
    if args.unfused_too:
        runs.append(("graphs-unfused", False, False))
    if args.tts_sampling_too:
        runs.append(("graphs-tts-sampling", False, True))
    for tag, eager, fused in runs:
        llm = LLM(folder, max_num_seqs=8, cuda_graph_max_batch=8, enforce_eager=eager, gpu_memory_utilization=0.5,
                  fused_decode=fused)
        profile_decode(llm, tag, sampling=TTS_SAMPLING if "sampling" in tag else None)
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
