"""Arrivals against running decodes, TTS-3B shape, random weights (load_format="dummy"), one GPU:
the engine's step time while requests arrive, with mixed steps run as graph parts
(`split_mixed_steps=True`: the decodes' CUDA graph + a graph per prefill chunk) against one eager
joint step (`False`, the engine before issue 19), in one run.

1. Tokens: 8 requests arriving two steps apart, greedy, 48 tokens each, split vs joint (bf16: the
   two paths round differently, so the agreement is reported, not asserted).
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
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from _util import device_name, print_table, write_json  # noqa: E402
from fp8 import bare_folder  # noqa: E402

from stepvox import LLM, SamplingParams  # noqa: E402
from stepvox.engine.config import TINY, TTS_3B  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def engine(folder: str, split: bool, smoke: bool) -> LLM:
    opts = (dict(device="cpu", kernel_backend="reference", max_model_len=512, num_kv_pages=512, max_num_seqs=16)
            if smoke else dict(max_model_len=4096, max_num_seqs=128, gpu_memory_utilization=0.85))
    return LLM(folder, load_format="dummy", split_mixed_steps=split, **opts)


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
                pure_steps=len(pure), pure_p50_ms=ms(statistics.median(pure)), pure_p99_ms=ms(percentile(pure, 0.99)),
                arrival_steps=len(during), arrival_p50_ms=ms(statistics.median(during)),
                arrival_p99_ms=ms(percentile(during, 0.99)), prefill_steps=len(with_prefill),
                prefill_step_p50_ms=ms(statistics.median(with_prefill)) if with_prefill else None,
                prefill_step_max_ms=ms(max(with_prefill)) if with_prefill else None,
                p99_arrivals_over_p50_pure=round(percentile(during, 0.99) / statistics.median(pure), 3),
                steps_ahead=eng.stats["steps_ahead"], steps=eng.stats["steps"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--base", type=int, default=32)
    ap.add_argument("--pure", type=int, default=200)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--arrival-s", type=float, default=10.0)
    ap.add_argument("--prompt", type=int, default=400)
    ap.add_argument("--arrival-tokens", type=int, default=200)
    args = ap.parse_args()
    if args.smoke:
        args.base, args.pure, args.arrival_s, args.prompt, args.arrival_tokens = 3, 5, 1.0, 20, 4
    res = {"device": device_name(), "torch": torch.__version__, "args": vars(args), "tokens": {}, "steps": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = bare_folder(os.path.join(tmp, "m"), TINY if args.smoke else TTS_3B)
        got = {}
        for split in (True, False):
            llm = engine(folder, split, args.smoke)
            try:
                got[split] = tokens_check(llm, 8 if args.smoke else 48)
                row = step_times(llm, args)
                row["split_mixed_steps"] = split
                res["steps"].append(row)
                print(row, flush=True)
                write_json("mixed_steps.json", res)
            finally:
                llm.shutdown()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        a, b = got[True], got[False]
        res["tokens"] = dict(requests=len(a), equal=sum(x == y for x, y in zip(a, b)),
                             first_divergence=[next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
                                               for x, y in zip(a, b)])
    write_json("mixed_steps.json", res)
    print("tokens split vs joint:", res["tokens"])
    print_table(res["steps"], ["split_mixed_steps", "pure_p50_ms", "pure_p99_ms", "arrival_p50_ms", "arrival_p99_ms",
                               "prefill_steps", "prefill_step_p50_ms", "p99_arrivals_over_p50_pure", "steps_ahead",
                               "steps"])


if __name__ == "__main__":
    main()
