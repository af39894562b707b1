"""Where the audio paths spend their time (one GPU): torch.profiler over the speech decoder (flow
solve with and without CUDA graphs, HiFT) and the audio tokenizer's offline 10 s encode, random
weights of the released sizes. Prints per case the kernel count, the summed kernel time and the
top kernels; JSON summary to $OUT/profile_audio.json.

  python bench/profile_audio.py [--only vocoder|tokenizer]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from _util import write_json
from tokenizer import SR, build_folder, speech_audio
from torch.profiler import ProfilerActivity, profile
from vocoder import make_prompt, random_decoder, tokens_for

from stepvox.engine.audio.tokenizer import AudioTokenizer
from stepvox.kernels import KernelConfig
from stepvox.testing.cosyvoice import FULL_SIZES
from stepvox.testing.tokenizer import FULL


def kernel_summary(prof, reps: int, top: int = 18) -> dict:
    """Per-call kernel count and device time, plus the top kernels by total time."""
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    count = sum(e.count for e in rows) / reps
    total_us = sum(e.self_device_time_total for e in rows) / reps
    rows.sort(key=lambda e: -e.self_device_time_total)
    tops = [{"name": e.key[:90], "calls": e.count / reps, "us": round(e.self_device_time_total / reps, 1),
             "avg_us": round(e.self_device_time_total / max(e.count, 1), 2)} for e in rows[:top]]
    return {"kernels_per_call": round(count, 1), "kernel_us_per_call": round(total_us, 1), "top": tops}


def run_profiled(tag: str, fn, reps: int = 3, results: dict | None = None) -> None:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / reps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    s = kernel_summary(prof, reps)
    s["wall_ms"] = round(wall_ms, 2)
    print(f"\n===== {tag}: wall {wall_ms:.2f} ms/call, {s['kernels_per_call']} kernels/call, "
          f"kernel time {s['kernel_us_per_call'] / 1e3:.2f} ms/call")
    for t in s["top"]:
        print(f"  {t['us']:9.1f} us  {t['calls']:7.1f}x  avg {t['avg_us']:7.2f}  {t['name']}")
    if results is not None:
        results[tag] = s


def profile_vocoder(results: dict) -> None:
    dev = torch.device("cuda")
    dec = random_decoder(FULL_SIZES, dev, KernelConfig())
    decoders = {True: dec, False: dec.variant(cuda_graphs=False)}
    prompt = make_prompt(3.0, dev)
    for seconds in (10.0, 0.84):
        toks = tokens_for(seconds)
        for graphs, d in decoders.items():
            with torch.inference_mode():
                run_profiled(f"flow {seconds}s {'graphs' if graphs else 'eager'}",
                             lambda: d.token2mel(toks, prompt=prompt, seed=0), results=results)
    with torch.inference_mode():
        mel = dec.token2mel(tokens_for(10.0), prompt=prompt, seed=0)
        run_profiled("hift 10s", lambda: dec.mel2wav(mel, seed=0), results=results)


def profile_tokenizer(results: dict) -> None:
    dev = torch.device("cuda")
    root = tempfile.mkdtemp(prefix="stepvox_prof_tok_")
    audio = speech_audio(20, 0, root)
    build_folder(root, FULL, dev, audio)
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        tok = AudioTokenizer.from_pretrained(root, device=dev, dtype=dt)
        clip = audio[: SR * 10]
        with torch.inference_mode():
            run_profiled(f"tokenizer 10s {name}", lambda: tok.tokenize(clip, SR), results=results)
            wav = torch.from_numpy(clip).to(dev)
            run_profiled(f"paraformer-only 10s {name}", lambda: tok.vq02_codes([wav]), results=results)
            run_profiled(f"s3-only 10s {name}", lambda: tok.vq06_codes([wav]), results=results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["vocoder", "tokenizer"])
    args = ap.parse_args()
    results: dict = {"device": torch.cuda.get_device_name()}
    if args.only in (None, "vocoder"):
        profile_vocoder(results)
    if args.only in (None, "tokenizer"):
        profile_tokenizer(results)
    write_json("profile_audio.json", results)


if __name__ == "__main__":
    main()
