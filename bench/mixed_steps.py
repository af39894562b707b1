"""Arrivals against running decodes, TTS-3B shape, random weights (load_format="dummy"), one GPU:
the engine's step time while requests arrive, with mixed steps run as graph parts
(`split_mixed_steps=True`: the decodes' CUDA graph + a graph per prefill chunk), with and without
the cap on prompt tokens per step while others decode (`max_prefill_while_decoding`, default 256),
against one eager joint step (the engine before issue 19), in one run (a process per variant).

1. Tokens: 8 requests arriving two steps apart, greedy, 48 tokens each, each variant vs the first
   (bf16: the paths round differently, so the agreement is reported, not asserted).
2. Step time: `--base` requests decode (long, ignore_eos); after a warm-up, `--pure` steps are timed,
   then requests with `--prompt`-token prompts arrive at `--rate` per second (wall clock) for
   `--arrival-s` seconds. Each engine.step() is timed on the host (what a stream waits between
   tokens); steps are split into those that computed a prefill chunk and those that did not.
   Reported: p50 / p99 of pure steps and of steps during arrivals, and p99(arrivals) / p50(pure).

    python bench/mixed_steps.py                 # on the GPU
    python bench/mixed_steps.py --smoke         # tiny shape on the CPU (checks the script)
JSON to $OUT/mixed_steps.json.
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from _util import device_name, percentile, print_table, write_json  # noqa: E402
from fp8 import bare_folder  # noqa: E402

from stepvox import LLM, SamplingParams  # noqa: E402
from stepvox.engine.config import TINY, TTS_3B  # noqa: E402


# name -> engine options: parts with the default prefill cap, parts without a cap, one joint eager step
VARIANTS = {"parts+cap": dict(split_mixed_steps=True),
            "parts": dict(split_mixed_steps=True, max_prefill_while_decoding=None),
            "joint": dict(split_mixed_steps=False, max_prefill_while_decoding=None)}


def engine(folder: str, options: dict, smoke: bool) -> LLM:
    opts = (dict(device="cpu", kernel_backend="reference", max_model_len=512, num_kv_pages=512, max_num_seqs=16)
            if smoke else dict(max_model_len=4096, max_num_seqs=128, gpu_memory_utilization=0.85))
    return LLM(folder, load_format="dummy", **opts, **options)


def prompt(i: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randint(1, 65536, (n,), generator=gen).tolist()


def tokens_check(llm: LLM, n_tokens: int) -> list[list[int]]:
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    ids, outs, step = [], {}, 0
    while len(ids) < 8 or eng.has_unfinished_requests():
        if len(ids) < 8 and step % 2 == 0:
            ids.append(eng.add_request(prompt(len(ids), 40 + 13 * len(ids)), params))
        for o in eng.step():
            outs[o.request_id] = o
        step += 1
    return [outs[i].outputs[0].token_ids for i in ids]


def step_times(llm: LLM, args) -> dict:
    eng = llm.engine
    long = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=args.arrival_tokens, ignore_eos=True)
    for i in range(args.base):
        eng.add_request(prompt(100 + i, 64), long)
    for _ in range(40):                                   # prefills done, graphs warm
        eng.step()
    if eng.stats["prefill_tokens"] == 0:
        raise RuntimeError("the base requests never prefilled")

    def timed_step():
        before = eng.stats["prefill_tokens"]
        t0 = time.perf_counter()
        eng.step()
        return time.perf_counter() - t0, eng.stats["prefill_tokens"] > before

    pure = [timed_step()[0] for _ in range(args.pure)]
    during, with_prefill, arrivals = [], [], 0
    start = time.perf_counter()
    next_arrival = start
    while time.perf_counter() - start < args.arrival_s:
        if time.perf_counter() >= next_arrival:
            eng.add_request(prompt(10_000 + arrivals, args.prompt), short)
            arrivals += 1
            next_arrival += 1.0 / args.rate
        dt, had_prefill = timed_step()
        during.append(dt)
        if had_prefill:
            with_prefill.append(dt)
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    return dict(base=args.base, arrivals=arrivals, prompt_tokens=args.prompt, rate_per_s=args.rate,
                pure_steps=len(pure), pure_p50_ms=ms(statistics.median(pure)), pure_p99_ms=ms(percentile(pure, 99)),
                arrival_steps=len(during), arrival_p50_ms=ms(statistics.median(during)),
                arrival_p99_ms=ms(percentile(during, 99)), prefill_steps=len(with_prefill),
                prefill_step_p50_ms=ms(statistics.median(with_prefill)) if with_prefill else None,
                prefill_step_max_ms=ms(max(with_prefill)) if with_prefill else None,
                p99_arrivals_over_p50_pure=round(percentile(during, 99) / statistics.median(pure), 3),
                steps_ahead=eng.stats["steps_ahead"], steps=eng.stats["steps"])


def run_variant(name: str, folder: str, args) -> dict:
    llm = engine(folder, VARIANTS[name], args.smoke)
    try:
        tokens = tokens_check(llm, 8 if args.smoke else 48)
        row = dict(variant=name, **step_times(llm, args))
    finally:
        llm.shutdown()
    return dict(row=row, tokens=tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="each runs in a process of its own")
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--pure", type=int, default=200)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--arrival-s", type=float, default=10.0)
    ap.add_argument("--prompt", type=int, default=400)
    ap.add_argument("--arrival-tokens", type=int, default=200)
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.base, args.pure, args.arrival_s, args.prompt, args.arrival_tokens = 3, 5, 1.0, 20, 4
    shape = TINY if args.smoke else TTS_3B
    if args.one:                       # a worker: one variant, its result to a file
        with tempfile.TemporaryDirectory() as tmp:
            out = run_variant(args.one[0], bare_folder(os.path.join(tmp, "m"), shape), args)
        with open(args.one[1], "w") as f:
            json.dump(out, f)
        return
    res = {"device": device_name(), "torch": torch.__version__, "args": vars(args), "steps": [], "tokens": {}}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            path = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--one", name, path] + sys.argv[1:]
            ran = subprocess.run(cmd)
            if ran.returncode != 0:
                res["steps"].append(dict(variant=name, failed=ran.returncode))
                continue
            with open(path) as f:
                out = json.load(f)
            tokens[name] = out["tokens"]
            res["steps"].append(out["row"])
            print(out["row"], flush=True)
            write_json("mixed_steps.json", res)
    first = next(iter(tokens), None)
    for name, got in tokens.items():
        ref = tokens[first]
        res["tokens"][name] = dict(vs=first, equal=sum(a == b for a, b in zip(got, ref)), requests=len(got),
                                   first_divergence=[next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), None)
                                                     for a, b in zip(got, ref)])
    write_json("mixed_steps.json", res)
    print("tokens:", res["tokens"])
    print_table(res["steps"], ["variant", "pure_p50_ms", "pure_p99_ms", "arrival_p50_ms", "arrival_p99_ms",
                               "prefill_steps", "prefill_step_p50_ms", "p99_arrivals_over_p50_pure", "steps_ahead",
                               "steps"])


if __name__ == "__main__":
    main()
