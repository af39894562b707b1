"""Every bench's correctness sections plus the headline figures, in one call on one GPU: the
re-check after a change that should not move numbers (a restructure, a dependency bump).

Runs, each as its own process with a time limit (a failure or a timeout is reported and the next
step still runs):
  gpu-tests  pytest -m gpu over tests/ (TRITON_INTERPRET=0: the kernels compile for the card)
  attention  bench/attention.py --only correctness
  gemv       bench/gemv.py --check-fused
  llm        bench/llm.py --decode-only --runs graphs,graphs-sync (batch-1 TTS-3B decode, async == sync)
  vocoder    bench/vocoder.py --sections check_kernels,check_model,stream,offline (first chunk, 10 s)
  tokenizer  bench/tokenizer.py --sections correctness,graphs,offline (10 s at batch 1, fp32 and bf16)
Prints a short table last (step, status, seconds, headline); each step's JSON lands in $OUT as its
bench writes it, every step's output in $OUT/check_all.log, a summary in $OUT/check_all.json.

  python bench/check_all.py [--steps llm,vocoder] [--limit-s 300]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _util import out_dir, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = {
    "gpu-tests": [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
    "attention": [sys.executable, os.path.join(HERE, "attention.py"), "--only", "correctness"],
    "gemv": [sys.executable, os.path.join(HERE, "gemv.py"), "--check-fused"],
    "llm": [sys.executable, os.path.join(HERE, "llm.py"), "--decode-only", "--runs", "graphs,graphs-sync"],
    "vocoder": [sys.executable, os.path.join(HERE, "vocoder.py"), "--sections",
                "check_kernels,check_model,stream,offline", "--reps", "10"],
    "tokenizer": [sys.executable, os.path.join(HERE, "tokenizer.py"), "--sections", "correctness,graphs,offline",
                  "--dtypes", "fp32,bf16", "--durations", "10", "--batches", "1"],
}


def _json(name: str) -> dict:
    path = os.path.join(out_dir(), name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def headline(step: str) -> str:
    """The figure each step exists for, read from the JSON its bench wrote."""
    if step == "llm":
        r = _json("llm_decode.json")  # --decode-only writes this file
        g = r.get("graphs", {})
        return (f"decode b1 {g.get('decode_b1_ms')} ms/token, TTS sampling {g.get('decode_b1_tts_sampling_ms')}; "
                f"async==sync {r.get('async_equals_sync')}")
    if step == "vocoder":
        r = _json("vocoder.json")
        t2w = r.get("offline", {}).get("token2wav 10s", {}).get("ms")
        return (f"first chunk {r.get('stream', {}).get('first_chunk_ms')} ms, token2wav 10 s {t2w} ms; "
                f"checks {r.get('check_kernels', {}).get('ok')}/{r.get('check_model', {}).get('ok')}")
    if step == "tokenizer":
        r = _json("tokenizer.json")
        rows = [f"{o['dtype']} graphs={o['graphs']} {o['ms']} ms" for o in r.get("offline", [])
                if o["seconds"] == 10 and o["batch"] == 1]
        return "10 s b1: " + ", ".join(rows)
    return ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ", ".join(STEPS))
    ap.add_argument("--limit-s", type=int, default=420, help="time limit of each step")
    args = ap.parse_args()
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
    summary, rows = {}, []
    for step in args.steps.split(","):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(STEPS[step], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=args.limit_s)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            status = f"timeout {args.limit_s} s"
            output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        seconds = round(time.perf_counter() - t0, 1)
        with open(os.path.join(out_dir(), "check_all.log"), "a") as f:
            f.write(f"===== {step}: {status} in {seconds} s\n{output}\n")
        tail = "\n".join(output.strip().splitlines()[-25:])
        print(f"===== {step}: {status} in {seconds} s\n{tail}\n", flush=True)
        summary[step] = dict(status=status, seconds=seconds, headline=headline(step), tail=tail)
        rows.append(dict(step=step, status=status, seconds=seconds, headline=summary[step]["headline"]))
        write_json("check_all.json", summary)
    print_table(rows, ["step", "status", "seconds", "headline"])


if __name__ == "__main__":
    main()
