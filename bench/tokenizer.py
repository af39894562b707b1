"""Audio tokenizer benchmark (issue 5): Step-Audio's dual-codebook tokenizer on one GPU, with random
weights of the released sizes written in the released formats (Paraformer folder, k-means .npy,
S3 v1 ONNX built with onnx.helper; codebooks drawn from the models' own outputs so that code
agreement rates mean something).

Sections (--sections picks some), each reported and skipped on failure without stopping the others:
  correctness  fp32 GPU vs the independent eager CPU replay of the official path (3 s), bf16/fp16
               vs fp32 code agreement, batched vs unbatched, live stream vs offline, ORT vs native
  graphs       offline CUDA graphs vs the eager path padded alike (equal codes) and unpadded, and
               the screened (TF32 + exact re-score) code search vs the all-IEEE one on the
               encoders' real outputs (equal codes expected)
  offline      tokens/s and latency for 3 / 10 / 30 s utterances at batch 1 and 16 (fp32, bf16),
               with CUDA graphs on (the default) and off
  stages       per-stage split of the 10 s batch-1 case (eager stages, the two graph replays,
               both code searches)
  streaming    time from the end of a 240 ms chunk to its codes (feed() wall time, steady state)
  onnxruntime  the same S3 ONNX file under ORT (CPU EP, and CUDA EP when installed), 10 s
Targets: 10 s utterance <= 15 ms at batch 1; streaming chunk latency <= 5 ms.
Prints a short table last and writes $OUT/tokenizer.json (default ./out).

  pip install --no-deps --no-build-isolation --use-pep517 -e . && python bench/tokenizer.py
  python bench/tokenizer.py --sections graphs,offline,stages --dtypes fp32,bf16
  python bench/tokenizer.py --smoke      # tiny sizes, few reps; runs on a CPU too
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch
import triton.testing
from _util import device_name, guarded, print_table, write_json

from stepvox.engine.audio.tokenizer import AudioTokenizer
from stepvox.engine.frontend.paraformer_features import FbankConfig, ParaformerFeatures
from stepvox.engine.frontend.preprocess import prepare_waveform
from stepvox.engine.frontend.resample import resample
from stepvox.engine.frontend.whisper_mel import whisper_log_mel
from stepvox.engine.models.paraformer import PARAFORMER_SUBDIR, ParaformerEncoder, parse_paraformer_config
from stepvox.engine.models.s3tokenizer import S3Config, S3Tokenizer, split_pieces
from stepvox.engine.models.yaml_reader import read_yaml
from stepvox.kernels.nearest_centroid import nearest_centroid_exhaustive, nearest_centroid_screened
from stepvox.testing import tokenizer as fx
from stepvox.testing.official_tokenizer import official_wav2token
from stepvox.testing.speech import espeak_wav

SR = 16000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp32tf32": torch.float32}       # fp32 weights, GEMMs on TF32 tensor cores (opt-in `tf32=True`)
TIMED = ("bf16", "fp32", "fp32tf32")      # dtypes the offline / stages / streaming sections time
SENTENCES = [
    "The tokenizer turns speech into two streams of discrete codes.",
    "One stream follows the words, the other follows how they sound.",
    "Every hundred and twenty milliseconds become five tokens for the language model.",
    "Streaming audio arrives in small pieces and the codes should follow without delay.",
    "A benchmark measures how fast that happens on a single graphics card.",
]


# ------------------------------------------------------------------------------------ helpers
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev, warmup=3, reps=20) -> float:
    """Median ms: triton.testing.do_bench (CUDA events) on a GPU, perf_counter medians elsewhere."""
    if dev.type == "cuda":
        return triton.testing.do_bench(fn, warmup=max(25, warmup), rep=max(100, reps * 5), return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def speech_audio(seconds: float, seed: int, workdir: str) -> np.ndarray:
    """Real speech from espeak-ng when installed (sentences repeated to length), else a voiced
    synthetic signal (harmonics with a moving pitch, syllable envelope, breath noise)."""
    n = int(seconds * SR)
    if shutil.which("espeak-ng"):
        try:
            pieces = []
            total = 0
            i = seed
            while total < n:
                wav, rate = espeak_wav(os.path.join(workdir, f"b{i}.wav"), SENTENCES[i % len(SENTENCES)])
                w = resample(torch.from_numpy(wav), rate, SR).numpy()
                pieces.append(w)
                total += w.size
                i += 1
            return np.concatenate(pieces)[:n].astype(np.float32)
        except Exception:  # noqa: BLE001 - fall back to synthetic audio
            pass
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 3.5 * t + seed), 0, None) ** 0.5
    return (0.3 * voiced * env + 0.01 * rng.standard_normal(n)).astype(np.float32)


def progress(message: str, since: float) -> None:
    """One flushed line per phase: a slow phase on the device shows where the time goes."""
    print(f"  .. {message} ({time.perf_counter() - since:.1f} s)", flush=True)


def agreement(a: list[int], b: list[int]) -> float:
    n = min(len(a), len(b))
    if n == 0:
        return float("nan")
    return float(np.mean(np.asarray(a[:n]) == np.asarray(b[:n]))) * (n / max(len(a), len(b)))


# ------------------------------------------------------------------------------------ setup
def data_codebook(rows: torch.Tensor, k: int, seed: int, normalise: bool) -> np.ndarray:
    """k centroids drawn from model outputs (plus a little noise): nearest-centroid decisions then
    happen at realistic margins, unlike a random codebook far from the data."""
    g = torch.Generator().manual_seed(seed)
    rows = rows.float().cpu()
    idx = torch.randint(0, rows.shape[0], (k,), generator=g)
    c = rows[idx] + 0.05 * rows.std() * torch.randn(k, rows.shape[1], generator=g)
    if normalise:
        c = torch.nn.functional.normalize(c, dim=-1)
    return c.numpy().astype(np.float32)


def build_folder(root: str, sizes, dev, audio: np.ndarray) -> dict:
    """Write the tokenizer folder; the codebooks come from running the random encoders on audio."""
    t0 = time.perf_counter()
    folder = os.path.join(root, PARAFORMER_SUBDIR)
    para_sd = fx.write_paraformer_dir(folder, sizes, seed=0)
    progress("wrote the Paraformer folder", t0)
    enc_cfg, _ = parse_paraformer_config(read_yaml(os.path.join(folder, "config.yaml")))
    encoder = ParaformerEncoder(enc_cfg)
    encoder.load_state_dict({k[8:]: v for k, v in para_sd.items() if k.startswith("encoder.")})
    encoder = encoder.to(dev).eval()
    shift, scale = fx.cmvn_values(sizes, 0)
    feats = ParaformerFeatures(FbankConfig(), torch.from_numpy(shift), torch.from_numpy(scale)).to(dev)
    wav = torch.from_numpy(audio[: SR * 20]).to(dev)
    with torch.inference_mode():
        rows, counts = feats.offline(wav / wav.abs().max() * 0.999)
        enc_rows = encoder.encode_offline([rows], [counts])[0]
    np.save(os.path.join(root, "linguistic_tokenizer.npy"), data_codebook(enc_rows, sizes.vq02_codes, 1, False))
    progress("drew the vq02 codebook", t0)
    del encoder
    s3_sd = fx.s3_tensors(sizes, 0)
    cfg = S3Config(n_state=sizes.s_state, n_head=sizes.s_heads, n_layer=sizes.s_layers,
                   codebook_size=sizes.vq06_codes)
    s3 = S3Tokenizer(cfg)
    s3.load_state_dict(s3_sd)
    s3 = s3.to(dev).eval()
    with torch.inference_mode():
        mel = whisper_log_mel(wav[: SR * 20])
        hidden = s3.encode_mel(mel[None], torch.tensor([mel.shape[1]], device=dev))[0]
    s3_sd["quantizer._codebook.embed"] = torch.from_numpy(data_codebook(hidden, sizes.vq06_codes, 2, True))
    del s3
    progress("drew the vq06 codebook", t0)
    fx.build_s3_onnx(os.path.join(root, "speech_tokenizer_v1.onnx"), s3_sd, sizes.s_heads)
    progress("wrote the S3 ONNX file", t0)
    return {"paraformer": para_sd, "s3": s3_sd, "cmvn": (shift, scale),
            "vq02_codebook": np.load(os.path.join(root, "linguistic_tokenizer.npy")),
            "write_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------ sections
def section_correctness(res, toks, sizes, audio, fixture, dev, smoke):
    out = res.setdefault("correctness", {})
    ref_tok = toks["fp32"]
    clip = audio[: SR * 3]
    # 1. fp32 on the device vs the independent CPU replay of the official path
    t0 = time.perf_counter()
    mine = ref_tok.tokenize(clip, SR)
    vq02, vq06, ids = official_wav2token(clip, SR, fixture, sizes)
    progress("fp32 vs the official replay", t0)
    out["fp32_vs_official_replay"] = {"vq02": agreement(mine.vq02, vq02), "vq06": agreement(mine.vq06, vq06),
                                      "ids_equal": mine.ids == ids}
    # 2. low precision vs fp32 on ~30 s of speech
    long = audio[: SR * (6 if smoke else 30)]
    base = ref_tok.tokenize(long, SR)
    for name, tok in toks.items():
        if name == "fp32":
            continue
        o = tok.tokenize(long, SR)
        out[f"{name}_vs_fp32"] = {"vq02": agreement(o.vq02, base.vq02), "vq06": agreement(o.vq06, base.vq06)}
    progress("low precision vs fp32", t0)
    # 3. batched vs unbatched (mixed lengths)
    lengths = [1.0, 2.5, 3.0, 7.3, 10.0, 12.1, 29.9, 31.0] if not smoke else [1.0, 2.5, 3.3]
    wavs = [audio[int(i * SR) % (SR * 5): int(i * SR) % (SR * 5) + int(s * SR)] for i, s in enumerate(lengths)]
    wavs = [np.resize(w, int(s * SR)) for w, s in zip(wavs, lengths)]
    for name, tok in toks.items():
        batched = tok.tokenize_batch(wavs, SR)
        single = [tok.tokenize(w, SR) for w in wavs]
        out[f"{name}_batched_equals_unbatched"] = all(
            (b.vq02, b.vq06) == (s.vq02, s.vq06) for b, s in zip(batched, single))
        out[f"{name}_batched_vs_unbatched_agreement"] = {
            "vq02": agreement(sum((b.vq02 for b in batched), []), sum((s.vq02 for s in single), [])),
            "vq06": agreement(sum((b.vq06 for b in batched), []), sum((s.vq06 for s in single), []))}
    progress("batched vs unbatched", t0)
    # 4. stream vs offline (no peak normalisation in streams)
    for name in ("fp32", "bf16"):
        tok = toks.get(name)
        if tok is None:
            continue
        clip10 = audio[: SR * (3 if smoke else 10)]
        off = tok.tokenize(clip10, SR, energy_norm=False)
        st = tok.stream()
        got = []
        for i in range(0, clip10.size, 1000):
            got += st.feed(clip10[i:i + 1000]).vq02
        got += st.finish().vq02
        out[f"{name}_stream_vq02_equals_offline"] = got == off.vq02
        out[f"{name}_stream_vq02_agreement"] = agreement(got, off.vq02)


def section_onnxruntime(res, root, toks, audio, dev, smoke):
    out = res.setdefault("onnxruntime", {})
    wav = prepare_waveform(audio[: SR * (3 if smoke else 10)], SR)
    mel = whisper_log_mel(wav)[None].numpy()
    length = np.array([mel.shape[-1]], np.int32)
    native = toks["fp32"].vq06_codes([wav.to(dev)])[0]
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    for prov in providers:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(os.path.join(root, "speech_tokenizer_v1.onnx"), sess_options=opts,
                                    providers=[prov])
        names = [i.name for i in sess.get_inputs()]
        run = lambda: sess.run(None, {names[0]: mel, names[1]: length})[0]  # noqa: E731
        codes = run()[0].tolist()
        times = []
        for _ in range(2 if smoke else 5):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        out[prov] = {"ms_s3_only": statistics.median(times), "agreement_with_native_fp32": agreement(codes, native)}


def section_graphs(res, toks, audio, dev, smoke):
    """Graph replays vs the eager path (padded alike: equal codes; unpadded: agreement), and the
    screened code search vs the all-IEEE search on the encoders' real outputs."""
    out = res.setdefault("graphs", {})
    lengths = [3.0, 10.0, 31.0] if not smoke else [1.0, 2.5]
    wavs = [np.roll(audio, 4000 * i)[: int(s_ * SR)] for i, s_ in enumerate(lengths)]
    for name, tok in toks.items():
        if dev.type != "cuda":
            break
        with_graphs = tok.tokenize_batch(wavs, SR) + [tok.tokenize(w, SR) for w in wavs]
        bucketed = tok.variant(use_cuda_graphs=False, bucket_eager=True)
        padded = bucketed.tokenize_batch(wavs, SR) + [bucketed.tokenize(w, SR) for w in wavs]
        eager = tok.variant(use_cuda_graphs=False)
        plain = eager.tokenize_batch(wavs, SR) + [eager.tokenize(w, SR) for w in wavs]
        out[f"{name}_graphs_equal_padded_eager"] = all(
            (a.vq02, a.vq06) == (b.vq02, b.vq06) for a, b in zip(with_graphs, padded))
        out[f"{name}_graphs_vs_unpadded_eager_agreement"] = {
            "vq02": agreement(sum((a.vq02 for a in with_graphs), []), sum((b.vq02 for b in plain), [])),
            "vq06": agreement(sum((a.vq06 for a in with_graphs), []), sum((b.vq06 for b in plain), []))}
        out[f"{name}_graphs_held"] = tok.graph_count
    tok = toks.get("fp32") or next(iter(toks.values()))
    wav = prepare_waveform(audio[: SR * (3 if smoke else 30)], SR, device=dev)
    with torch.inference_mode():
        rows, counts = tok.features.offline(wav)
        enc = tok.linguistic.encoder.encode_offline([rows], [counts])[0].float()
        mel = whisper_log_mel(split_pieces(wav)[0])
        hidden = tok.semantic.model.encode_mel(mel[None], torch.tensor([mel.shape[1]], device=dev), False)[0]
        hidden = torch.nn.functional.normalize(hidden.float(), dim=-1)
    if dev.type == "cuda":
        s3_codebook = tok.semantic.model.quantizer._codebook.embed
        for tag, x, cb in (("vq02", enc, tok.linguistic.codebook), ("vq06", hidden, s3_codebook)):
            sq = cb.float().pow(2).sum(-1)
            a = nearest_centroid_screened(x, cb, sq)
            b = nearest_centroid_exhaustive(x, cb, sq)
            out[f"{tag}_screened_vs_exhaustive_mismatches"] = int((a != b).sum())
            out[f"{tag}_search_rows"] = int(x.shape[0])


def section_offline(res, toks, audio, dev, smoke, durations=None, batches=None):
    rows = res.setdefault("offline", [])
    durations = durations or ([1, 3] if smoke else [3, 10, 30])
    batches = batches or ([1, 2] if smoke else [1, 16])
    for name in TIMED:
        tok = toks.get(name)
        if tok is None:
            continue
        for graphs in ((True, False) if dev.type == "cuda" else (False,)):
            t = tok if graphs or dev.type != "cuda" else tok.variant(use_cuda_graphs=False)
            for dur in durations:
                for b in batches:
                    wavs = [np.roll(audio, 7919 * i)[: dur * SR] for i in range(b)]
                    n_tokens = sum(len(o.vq02) + len(o.vq06) for o in t.tokenize_batch(wavs, SR))   # + capture
                    ms = time_ms(lambda: t.tokenize_batch(wavs, SR), dev, reps=3 if smoke else 20)
                    rows.append({"dtype": name, "graphs": graphs, "seconds": dur, "batch": b, "ms": round(ms, 2),
                                 "codes_per_s": round(n_tokens / ms * 1e3), "x_realtime": round(dur * b / ms * 1e3)})
                    write_json("tokenizer.json", res)


def section_stages(res, toks, audio, dev, smoke):
    """Where the 10 s batch-1 time goes (device-synchronised stage by stage)."""
    out = res.setdefault("stages_10s_b1", {})
    for name in TIMED:
        tok = toks.get(name)
        if tok is None:
            continue
        wav_np = audio[: SR * (3 if smoke else 10)]
        wav = prepare_waveform(wav_np, SR, device=dev)
        rows, counts = tok.features.offline(wav)
        para, s3 = tok.linguistic.encoder, tok.semantic.model
        with torch.inference_mode():
            enc = para.encode_offline([rows], [counts])[0]
        pieces = split_pieces(wav)
        mels = [whisper_log_mel(p) for p in pieces]
        lens = torch.tensor([m.shape[-1] for m in mels], device=dev)
        mel = mels[0][None]
        reps = 3 if smoke else 20
        with torch.inference_mode():
            hidden = torch.nn.functional.normalize(s3.encode_mel(mel, lens[:1], False)[0].float(), dim=-1)
            r = {
                "prepare_ms": time_ms(lambda: prepare_waveform(wav_np, SR, device=dev), dev, reps=reps),
                "fbank_lfr_cmvn_ms": time_ms(lambda: tok.features.offline(wav), dev, reps=reps),
                "whisper_mel_ms": time_ms(lambda: whisper_log_mel(pieces[0]), dev, reps=reps),
                "paraformer_eager_ms": time_ms(lambda: para.encode_offline([rows], [counts]), dev, reps=reps),
                "vq02_search_ms": time_ms(lambda: tok.linguistic.codes_of_rows(enc), dev, reps=reps),
                "s3_eager_encoder_and_search_ms": time_ms(lambda: s3(mel, lens[:1], False), dev, reps=reps),
                "vq06_search_ms": time_ms(lambda: s3.quantize(hidden), dev, reps=reps),
            }
            if dev.type == "cuda":
                cb = s3.quantizer._codebook.embed
                sq = cb.float().pow(2).sum(-1)
                r["vq06_search_exhaustive_ms"] = time_ms(lambda: nearest_centroid_exhaustive(hidden, cb, sq), dev,
                                                         reps=reps)
                r["vq02_search_exhaustive_ms"] = time_ms(
                    lambda: nearest_centroid_exhaustive(enc.float(), tok.linguistic.codebook, tok.linguistic.sqnorm),
                    dev, reps=reps)
                tok.linguistic.launch([rows], [counts])                    # capture outside the timing
                tok.semantic.launch(mels)
                r["paraformer_graph_ms"] = time_ms(lambda: tok.linguistic.launch([rows], [counts]), dev, reps=reps)
                r["s3_graph_ms"] = time_ms(lambda: tok.semantic.launch(mels), dev, reps=reps)
                r["both_graphs_concurrent_ms"] = time_ms(lambda: tok.codes([wav]), dev, reps=reps)
            for graphs in ((True, False) if dev.type == "cuda" else (False,)):
                t = tok if graphs or dev.type != "cuda" else tok.variant(use_cuda_graphs=False)
                r[f"tokenize_graphs={graphs}_ms"] = time_ms(lambda: t.tokenize(wav_np, SR), dev, reps=reps)
        out[name] = {k: round(v, 3) for k, v in r.items()}


def section_streaming(res, toks, audio, dev, smoke):
    out = res.setdefault("streaming", {})
    chunk = 3840
    n_chunks = 12 if smoke else 100          # < 30 s: no S3 piece flush inside the timed feeds
    for name in TIMED:
        tok = toks.get(name)
        if tok is None:
            continue
        for graphs in ((True, False) if dev.type == "cuda" else (False,)):
            st = (tok if graphs or dev.type != "cuda" else tok.variant(use_cuda_graphs=False)).stream()
            lat = []
            for i in range(n_chunks):
                piece = audio[i * chunk:(i + 1) * chunk]
                sync(dev)
                t0 = time.perf_counter()
                upd = st.feed(piece)
                lat.append((time.perf_counter() - t0) * 1e3)
                assert len(upd.vq02) == 4, f"expected 4 codes per 240 ms chunk, got {len(upd.vq02)}"
            st.finish()
            steady = lat[8:]                      # after warm-up and once the look-back is full
            out[f"{name}_graphs={graphs}"] = {"median_ms": statistics.median(steady),
                                             "p90_ms": float(np.percentile(steady, 90)), "max_ms": max(steady),
                                             "first_chunk_ms": lat[0]}
        # the feed that completes a 30 s piece also runs the S3 encoder on it (the second time:
        # the first one captures the S3 graph of a whole piece)
        for _ in range(2):
            st = tok.stream()
            st.feed(audio[: 480000 - chunk])
            sync(dev)
            t0 = time.perf_counter()
            st.feed(audio[480000 - chunk:480000])
            out[f"{name}_30s_piece_flush_ms"] = (time.perf_counter() - t0) * 1e3
            st.finish()


# ------------------------------------------------------------------------------------ main
def ints(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",")] if text else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and few reps (CPU ok)")
    ap.add_argument("--keep", help="write the random tokenizer folder here and keep it")
    ap.add_argument("--sections", default="correctness,graphs,offline,stages,streaming,onnxruntime",
                    help="comma-separated subset of the sections to run")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16",
                    help="comma-separated model dtypes to load (fp32, bf16, fp16, fp32tf32)")
    ap.add_argument("--durations", help="offline section: seconds per utterance, e.g. 3,10,30")
    ap.add_argument("--batches", help="offline section: batch sizes, e.g. 1,16")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = fx.TINY if args.smoke else fx.FULL
    res = {"device": device_name(), "smoke": args.smoke, "sizes": sizes.__dict__, "torch": torch.__version__}
    root = args.keep or tempfile.mkdtemp(prefix="stepvox_tok_")
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    audio = speech_audio(40 if args.smoke else 60, 0, root)
    progress(f"made {len(audio) / SR:.0f} s of test audio", t0)
    res["audio"] = "espeak-ng" if shutil.which("espeak-ng") else "synthetic"
    fixture = guarded(res, "setup", lambda: build_folder(root, sizes, dev, audio))
    toks = {}
    if fixture is not None:
        res["write_folder_s"] = round(fixture["write_s"], 1)
        for name, dt in DTYPES.items():
            if name not in args.dtypes.split(","):
                continue
            if dev.type == "cpu" and name != "fp32":
                continue                                  # CPU smoke: fp32 only
            t0 = time.perf_counter()
            tok = guarded(res, f"load_{name}", lambda dt=dt, tf32=name == "fp32tf32":
                          AudioTokenizer.from_pretrained(root, device=dev, dtype=dt, tf32=tf32))
            if tok is not None:
                toks[name] = tok
                res[f"load_{name}_s"] = round(time.perf_counter() - t0, 2)
                progress(f"loaded the {name} tokenizer", t0)
    runs = [("correctness", lambda: section_correctness(res, toks, sizes, audio, fixture, dev, args.smoke)),
            ("graphs", lambda: section_graphs(res, toks, audio, dev, args.smoke)),
            ("offline", lambda: section_offline(res, toks, audio, dev, args.smoke, ints(args.durations),
                                                ints(args.batches))),
            ("stages", lambda: section_stages(res, toks, audio, dev, args.smoke)),
            ("streaming", lambda: section_streaming(res, toks, audio, dev, args.smoke)),
            # last: ORT's CPU thread pool keeps spinning after a run and would slow what follows
            ("onnxruntime", lambda: section_onnxruntime(res, root, toks, audio, dev, args.smoke))]
    for name, fn in runs:
        if toks and name in sections:
            t0 = time.perf_counter()
            guarded(res, name, fn)
            res.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
            write_json("tokenizer.json", res)          # partial results survive a time limit
            key = {"stages": "stages_10s_b1"}.get(name, name)
            print(f"[{name}] {res['section_s'][name]} s: {json.dumps(res.get(key), default=str)}", flush=True)
    path = write_json("tokenizer.json", res)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)

    # ---------------------------------------------------------------- summary table (last)
    table = []
    for r in res.get("offline", []):
        table.append({"case": f"offline {r['dtype']} {'graphs' if r['graphs'] else 'eager'} {r['seconds']}s "
                              f"b{r['batch']}", "ms": r["ms"],
                      "codes/s": r["codes_per_s"], "note": f"{r['x_realtime']}x realtime" +
                      (" (target <=15 ms)" if r["seconds"] == 10 and r["batch"] == 1 else "")})
    for k, v in res.get("streaming", {}).items():
        if isinstance(v, dict):
            table.append({"case": f"stream chunk {k}", "ms": round(v["median_ms"], 2), "codes/s": "",
                          "note": f"p90 {v['p90_ms']:.2f} ms (target <=5 ms)"})
    for k, v in res.get("onnxruntime", {}).items():
        table.append({"case": f"ORT {k} S3 10s", "ms": round(v["ms_s3_only"], 1), "codes/s": "",
                      "note": f"agree w/ native {v['agreement_with_native_fp32']:.3f}"})
    for name, st in res.get("stages_10s_b1", {}).items():
        for k, v in st.items():
            table.append({"case": f"stage {name} {k[:-3]}", "ms": v, "codes/s": "", "note": ""})
    for k, v in list(res.get("correctness", {}).items()) + list(res.get("graphs", {}).items()):
        table.append({"case": f"check {k}", "ms": "", "codes/s": "", "note": str(v)})
    for k, v in res.get("errors", {}).items():
        table.append({"case": f"ERROR {k}", "ms": "", "codes/s": "", "note": v[:100]})
    print(f"\nstepvox audio tokenizer on {res['device']} ({'smoke' if args.smoke else 'full size'}); JSON: {path}")
    print_table(table, ["case", "ms", "codes/s", "note"])


if __name__ == "__main__":
    main()
