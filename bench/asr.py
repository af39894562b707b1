"""Speech recognition benchmark: the Step-Audio-Tokenizer's own streaming Paraformer
(engine/audio/transcriber.py) on one GPU, random weights in the released formats.

Sections (each reported and skipped on failure without stopping the others):
  correctness  tiny folder: CUDA fp32 offline and streamed vs the independent eager CPU rendering of
               FunASR's streaming inference (token agreement); released sizes: bf16 vs fp32
  offline      released sizes: latency of transcribe() for 3 / 10 / 30 s at batch 1 and 10 s at
               batch 8 (fp32, bf16), and the tokenizer's vq02+vq06 tokenize() for comparison
  streaming    released sizes: feed() wall time per 240 ms piece (steady state) and finish()
Prints a table last and writes $OUT/asr.json (default ./out).

  python bench/asr.py                     # on the GPU machine
  python bench/asr.py --smoke             # tiny sizes, few reps; runs on a CPU too
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from _util import device_name, guarded, write_json

from stepvox.engine.audio.tokenizer import AudioTokenizer
from stepvox.kernels import KernelConfig
from stepvox.testing import tokenizer as fx
from stepvox.testing.official_asr import official_recognize

SR = 16000


def voiced(seconds: float, seed: int) -> np.ndarray:
    """A speech-like signal (harmonics with a moving pitch, syllable envelope, breath noise)."""
    n = int(seconds * SR)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    wave = sum(np.sin(k * phase + rng.uniform(0, 6)) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 3.5 * t + seed), 0, None) ** 0.5
    return (0.3 * wave * env + 0.01 * rng.standard_normal(n)).astype(np.float32)


def wall_ms(fn, dev, warmup=2, reps=10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def agreement(a: list[int], b: list[int]) -> float:
    n = max(len(a), len(b))
    return 1.0 if n == 0 else sum(x == y for x, y in zip(a, b)) / n


def streamed(asr, wav: np.ndarray, piece: int):
    stream = asr.stream()
    for i in range(0, wav.size, piece):
        stream.feed(wav[i:i + piece])
    return stream.finish()


def section_correctness(res, tiny_root, tiny_fixture, full, dev, smoke):
    out = res.setdefault("correctness", {})
    tok = AudioTokenizer.from_pretrained(tiny_root, device=dev, asr=True)
    rows = []
    for seed, seconds in enumerate([2.0, 5.3, 9.6][: 2 if smoke else 3]):
        wav = voiced(seconds, seed)
        ref_ids, ref_text = official_recognize(torch.from_numpy(wav), tiny_fixture, fx.TINY)
        off = tok.transcriber.transcribe(wav, SR)
        st = streamed(tok.transcriber, wav, 1234)
        rows.append({"seconds": seconds, "tokens": len(ref_ids), "offline_vs_ref": agreement(off.token_ids, ref_ids),
                     "stream_vs_offline": agreement(st.token_ids, off.token_ids),
                     "text_equal": off.text == ref_text == st.text})
    out["tiny_fp32"] = rows
    wav = voiced(10.0, 7)
    ids = {name: t.transcriber.transcribe(wav, SR).token_ids for name, t in full.items()}
    if "bf16" in ids and "fp32" in ids:
        out["released_bf16_vs_fp32"] = {"tokens_fp32": len(ids["fp32"]), "tokens_bf16": len(ids["bf16"]),
                                        "agreement": agreement(ids["bf16"], ids["fp32"])}


def section_offline(res, full, dev, smoke):
    out = res.setdefault("offline", [])
    for name, tok in full.items():
        asr = tok.transcriber
        for seconds, batch in ([(3, 1)] if smoke else [(3, 1), (10, 1), (30, 1), (10, 8)]):
            wavs = [voiced(seconds, s) for s in range(batch)]
            ms = wall_ms(lambda: asr.transcribe_batch(wavs, SR), dev)
            tok_ms = wall_ms(lambda: tok.tokenize_batch(wavs, SR), dev)
            out.append({"dtype": name, "seconds": seconds, "batch": batch, "transcribe_ms": round(ms, 2),
                        "rtf": round(ms / 1e3 / (seconds * batch), 5), "tokenize_ms": round(tok_ms, 2)})


def section_streaming(res, full, dev, smoke):
    out = res.setdefault("streaming", [])
    piece = 3840
    for name, tok in full.items():
        wav = voiced(6 if smoke else 20, 3)
        stream = tok.transcriber.stream()
        times = []
        for i in range(0, wav.size - piece, piece):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            stream.feed(wav[i:i + piece])
            times.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        final = stream.finish()
        finish_ms = (time.perf_counter() - t0) * 1e3
        steady = times[5:] or times
        out.append({"dtype": name, "feed_ms_median": round(statistics.median(steady), 2),
                    "feed_ms_p90": round(float(np.percentile(steady, 90)), 2), "finish_ms": round(finish_ms, 2),
                    "tokens": len(final.token_ids)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, few reps (runs on a CPU)")
    ap.add_argument("--sections", default="correctness,offline,streaming")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = KernelConfig() if dev.type == "cuda" else KernelConfig(backend="reference")
    res = {"device": device_name(), "smoke": args.smoke}
    work = tempfile.mkdtemp(prefix="asr-bench-")
    tiny_root = os.path.join(work, "tiny")
    tiny_fixture = fx.write_tokenizer_dir(tiny_root, fx.TINY, seed=5)
    # the released Paraformer (encoder + recognizer); a small S3 model, which ASR never runs
    sizes = fx.TINY if args.smoke else dataclasses.replace(fx.FULL, s_state=128, s_heads=2, s_layers=2,
                                                               vq06_codes=96)
    full_root = os.path.join(work, "full")
    t0 = time.perf_counter()
    fx.write_tokenizer_dir(full_root, sizes, seed=0)
    res["write_s"] = round(time.perf_counter() - t0, 1)
    full = {name: AudioTokenizer.from_pretrained(full_root, device=dev, dtype=dtype, asr=True, kernels=kernels)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            if dev.type == "cuda" or dtype == torch.float32}
    sections = args.sections.split(",")
    if "correctness" in sections:
        guarded(res, "correctness", lambda: section_correctness(res, tiny_root, tiny_fixture, full, dev, args.smoke))
    if "offline" in sections:
        guarded(res, "offline", lambda: section_offline(res, full, dev, args.smoke))
    if "streaming" in sections:
        guarded(res, "streaming", lambda: section_streaming(res, full, dev, args.smoke))
    path = write_json("asr.json", res)
    for key in ("correctness", "offline", "streaming", "errors"):
        if key in res:
            print(key, res[key] if not isinstance(res[key], list) else "")
            for row in res[key] if isinstance(res[key], list) else []:
                print("  ", row)
    print("wrote", path)


if __name__ == "__main__":
    main()
