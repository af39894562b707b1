"""TTS pipeline benchmark on one GPU: stepvox's TTS against the official Step-Audio path, with random
weights of the released shapes written in the released formats.

Folders (written once, or reused with --folders): Step-Audio-TTS-3B (the Step1 3B LM, 7.06 GB of bf16
drawn on the GPU and saved in 2 GB safetensors shards with index, config and tokenizer; the LM
head's speech rows scaled so that random weights emit speech tokens, as the trained model does;
CosyVoice-300M-25Hz at the released sizes, its -Music twin linked to the same files), a
Step-Audio-Tokenizer folder at the released sizes and an official speakers folder.

ours      TTS.from_pretrained(model, tokenizer, speakers, device="cuda"); one request with a built-in
          voice first (compiles, captures graphs); a voice registered from a speech-like reference
          (espeak-ng when installed); then at concurrency 1, 20-character texts: first audio (time
          from calling stream() to its first chunk) of the voice's first request (cold) and of
          --reps more with new texts (warm, median); stream total and RTF (synthesis time / audio
          seconds) for --tokens audio tokens (ignore_eos: random weights never stop); synthesize()
          end to end.
official  in a subprocess, with transformers 4.48.3 (the official pin; its wheels unpacked in
          --official-site): AutoModelForCausalLM.from_pretrained(a copy of the model folder with the
          HF remote code read from the ignored .official/, torch_dtype=bfloat16, device_map="cuda",
          trust_remote_code=True), then generate() as the official tts.py calls it (do_sample,
          temperature 0.7, top-k 50, the repetition-aware rule) on the same prompt ids, --tokens new
          tokens (EOS held off with min_new_tokens). The Optimus flash-attention .so files of the
          release are built for torch <= 2.5 / CUDA 12 / Python 3.10, so the official code runs its
          own fallback: SDPA with the sqrt-ALiBi mask it rebuilds per layer and step. Its decoder
          (CosyVoice, fp32 eager) is stood in for by our offline SpeechDecoder.token2wav of the same
          tokens: a lower bound. The official path speaks only when the whole utterance is decoded,
          so its first audio = generate + token2wav.

Every phase prints a flushed line with the elapsed time; a failing section is recorded and the
others still run. Prints a table last; JSON to $OUT/tts.json (or --out DIR).

  python bench/tts.py --official-site /tmp/official-site     # on the GPU
  python bench/tts.py --folders /tmp/tts-folders --keep        # write once, reuse in later runs
  python bench/tts.py --smoke                                  # tiny folders on the CPU: catches errors
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:          # the CPU run: Triton must hear of its interpreter before it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _util import device_name, guarded, parse_args_or_work, print_table, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_CODE = os.path.join(REPO, ".official")          # HF remote code: ignored, never committed
OFFICIAL_FILES = ("configuration_step1.py", "modeling_step1.py")
VOICE = "bench-voice"
VOICE_TRANSCRIPT = "Hello, this is the reference voice of the benchmark, speaking a few short sentences."
ESPEAK_TEXT = ("Hello, this is the reference voice of the benchmark. It speaks a few short sentences, "
               "so that the prompt lasts several seconds.")
TEXT_CHARS = 20
TEXT_POOL = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
             "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性"
             "好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道")
START = time.perf_counter()


def log(message: str) -> None:
    """One flushed line per phase with the time since start: a slow phase on the device shows where it is."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def texts(n: int, seed: int = 0) -> list[str]:
    """n different 20-character sentences (19 characters and a full stop): a new text per request,
    so a warm request shares the voice's prefix with the earlier ones but not the whole prompt."""
    rng = random.Random(seed)
    return ["".join(rng.choice(TEXT_POOL) for _ in range(TEXT_CHARS - 1)) + "。" for _ in range(n)]


def median(values):
    return statistics.median(values) if values else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- folders
def write_lm_3b(folder: str, device: str, shard_bytes: int = 2 << 30, audio_head_scale: float = 4.0) -> None:
    """Step-Audio-TTS-3B's LM files with random bf16 weights: tensors drawn on `device` (fast), saved
    in ~2 GB shards with the index; config.json, tokenizer.model and tokenizer_config.json as
    released. The LM head's speech rows are scaled up so that sampling emits speech tokens."""
    from safetensors.torch import save_file

    from stepvox.engine.config import TTS_3B, Step1Config
    from stepvox.engine.models.step1_checkpoint import INDEX_FILE, expected_shapes
    from stepvox.engine.special_tokens import AUDIO_TOKEN_OFFSET, AUDIO_TOKENS_END
    from stepvox.testing.step1 import config_dict, write_tokenizer

    os.makedirs(folder, exist_ok=True)
    raw = config_dict(**TTS_3B)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    cfg = Step1Config.from_dict(raw)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, shard, size, total, n = {}, {}, 0, 0, 1

    def save_shard():
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        log(f"   wrote {name} ({size / 2**30:.2f} GiB)")
        shard, size, n = {}, 0, n + 1

    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            scale = {"model.embed_tokens.weight": 1.0, "lm_head.weight": 3.0 / shape[1] ** 0.5}.get(
                name, shape[-1] ** -0.5)
            w = torch.randn(shape, device=device, generator=gen) * scale
            if name == "lm_head.weight":
                w[AUDIO_TOKEN_OFFSET:AUDIO_TOKENS_END] *= audio_head_scale
            t = w.to(torch.bfloat16).cpu()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            save_shard()
    if shard:
        save_shard()
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    write_tokenizer(folder, cfg.vocab_size, cfg.max_seq_len)
    if device == "cuda":
        torch.cuda.empty_cache()       # the engine sizes its KV cache from the memory left free
    log(f"   LM: {total / 1e9:.2f} GB in {n - 1} shards")


def write_released_folders(root: str, device: str) -> dict[str, str]:
    """The three folders at the released sizes (see the module docstring)."""
    from stepvox.testing.cosyvoice import FULL_SIZES, write_cosyvoice_dir
    from stepvox.testing.tokenizer import FULL, write_tokenizer_dir
    from stepvox.testing.tts import write_speakers_dir

    model = os.path.join(root, "Step-Audio-TTS-3B")
    log(f"writing the LM (7.06 GB, drawn on {device})")
    write_lm_3b(model, device)
    log("wrote the LM")
    common = write_cosyvoice_dir(os.path.join(model, "CosyVoice-300M-25Hz"), seed=0, sizes=FULL_SIZES)
    music = os.path.join(model, "CosyVoice-300M-25Hz-Music")      # same architecture: link, not a second copy
    os.makedirs(music, exist_ok=True)
    for f in os.listdir(common):
        if not os.path.lexists(os.path.join(music, f)):
            os.symlink(os.path.join(common, f), os.path.join(music, f))
    log("wrote CosyVoice-300M-25Hz (released sizes; -Music linked to it)")
    tokenizer = os.path.join(root, "Step-Audio-Tokenizer")
    write_tokenizer_dir(tokenizer, FULL, seed=0)
    log("wrote Step-Audio-Tokenizer (released sizes)")
    return {"model": model, "tokenizer": tokenizer, "speakers": write_speakers_dir(os.path.join(root, "speakers"))}


def prepare_folders(root: str, smoke: bool, device: str, res: dict) -> dict[str, str]:
    """Reuse `root` when a run of the same kind completed it, else write it."""
    marker = os.path.join(root, "bench-complete.json")
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("smoke") == smoke:
            log(f"reusing the folders in {root} (written in {done['write_s']:.1f} s)")
            res["folders_reused"] = True
            return done["paths"]
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    if smoke:
        from stepvox.testing.tts import write_tts_folders
        paths = write_tts_folders(root)
    else:
        paths = write_released_folders(root, device)
    res["write_folders_s"] = time.perf_counter() - t0
    with open(marker, "w") as f:
        json.dump({"smoke": smoke, "write_s": res["write_folders_s"], "paths": paths}, f)
    log(f"folders written in {res['write_folders_s']:.1f} s")
    return paths


def reference_voice(seconds: float, workdir: str) -> tuple[np.ndarray, int]:
    """Speech from espeak-ng when installed (cut to `seconds`), else voiced_audio (speech-like)."""
    from stepvox.testing.tts import voiced_audio
    if shutil.which("espeak-ng"):
        try:
            from stepvox.testing.speech import espeak_wav
            wav, rate = espeak_wav(os.path.join(workdir, "voice.wav"), ESPEAK_TEXT)
            if wav.size >= seconds * rate * 0.8:
                return wav[: int(seconds * rate)].astype(np.float32), rate
        except Exception as exc:  # noqa: BLE001 - fall back to the synthetic voice
            log(f"espeak-ng failed ({exc}); a synthetic voice instead")
    return voiced_audio(seconds, 22050, seed=5), 22050


# ----------------------------------------------------------------------------- ours
def stream_request(tts, text: str, voice: str, tokens: int, seed: int) -> dict:
    """One request through stream(): ms from the call to the first chunk, ms to the last, audio seconds."""
    t0 = time.perf_counter()
    first, samples = None, 0
    for chunk in tts.stream(text, voice, max_tokens=tokens, ignore_eos=True, seed=seed):
        if first is None:
            first = time.perf_counter() - t0
        samples += chunk.samples.size
    total = time.perf_counter() - t0
    audio_s = samples / tts.sample_rate
    return dict(first_audio_ms=first * 1e3, total_ms=total * 1e3, samples=samples, audio_s=audio_s,
                rtf=total / audio_s if audio_s else None)


def run_ours(tts, args, sentences: list[str], ref: tuple[np.ndarray, int], res: dict) -> None:
    out = res["ours"]
    log("engine's first request (built-in voice; compiles kernels, captures graphs) ...")
    r = stream_request(tts, sentences[0], "Tingting", args.tokens, seed=0)
    out["engine_first_request"] = r
    log(f"engine's first request (built-in voice): first audio {r['first_audio_ms']:.0f} ms, "
        f"total {r['total_ms']:.0f} ms")
    t0 = time.perf_counter()
    tts.register_voice(VOICE, ref[0], VOICE_TRANSCRIPT, sample_rate=ref[1])
    out["register_voice_ms"] = (time.perf_counter() - t0) * 1e3
    out["voice_seconds"] = ref[0].size / ref[1]
    out["prompt_tokens"] = len(tts.prompt_token_ids(sentences[1], VOICE))
    log(f"registered a {out['voice_seconds']:.1f} s voice in {out['register_voice_ms']:.0f} ms; "
        f"prompt {out['prompt_tokens']} tokens")
    cold = stream_request(tts, sentences[1], VOICE, args.tokens, seed=1)
    out["cold"] = cold
    log(f"voice's first request (cold): first audio {cold['first_audio_ms']:.0f} ms, total {cold['total_ms']:.0f} ms")
    warm = []
    for i in range(args.reps):
        warm.append(stream_request(tts, sentences[2 + i], VOICE, args.tokens, seed=2 + i))
        log(f"warm request {i + 1}/{args.reps}: first audio {warm[-1]['first_audio_ms']:.0f} ms, "
            f"total {warm[-1]['total_ms']:.0f} ms, {warm[-1]['audio_s']:.2f} s of audio")
    out["warm"] = warm
    out["warm_first_audio_ms"] = median([w["first_audio_ms"] for w in warm])
    out["warm_total_ms"] = median([w["total_ms"] for w in warm])
    out["warm_rtf"] = median([w["rtf"] for w in warm])
    out["audio_s"] = median([w["audio_s"] for w in warm])
    synth = []
    for i in range(args.reps):
        text = sentences[2 + args.reps + i]
        t0 = time.perf_counter()
        audio = tts.synthesize(text, VOICE, max_tokens=args.tokens, ignore_eos=True, seed=100 + i)
        synth.append(dict(ms=(time.perf_counter() - t0) * 1e3, audio_s=audio.duration))
    out["synthesize"] = synth
    out["synthesize_ms"] = median([s["ms"] for s in synth])
    out["synthesize_rtf"] = median([s["ms"] / 1e3 / s["audio_s"] for s in synth])
    log(f"synthesize(): {out['synthesize_ms']:.0f} ms (median of {args.reps})")


def parse_first_windows(spec: str) -> list[tuple[int, int]]:
    """"15+20,10+10,5+5" -> [(first_hop_tokens, overlap_tokens), ...]."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        hop, _, overlap = item.partition("+")
        out.append((int(hop), int(overlap)))
    return out


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    n = min(reference.size, other.size)
    err = float(np.sum((reference[:n] - other[:n]) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(reference[:n] ** 2)) / err)


def run_first_windows(tts, args, res: dict) -> None:
    """First-chunk sweep: for each (first hop, overlap) of the decoder stream, warm first audio (one
    request to capture the new window sizes, then --reps) and how far the streamed audio is from the
    offline decode of the same tokens (SNR over the first second and the whole; random weights, so
    this measures the windowing, not speech quality)."""
    from stepvox.engine.audio.decoder_stream import StreamConfig
    from stepvox.engine.special_tokens import FLOW_VOCAB
    keep = tts.stream_config
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, FLOW_VOCAB, size=min(args.tokens, 250)).tolist()
    prompt = tts.voice_registry.get(VOICE).prompt
    offline = tts.decoder.token2wav(tokens, prompt=prompt, seed=3).float().cpu().numpy()
    second = tts.sample_rate
    rows = []
    try:
        for n, (hop, overlap) in enumerate(parse_first_windows(args.first_windows)):
            cfg = StreamConfig(first_hop_tokens=hop, overlap_tokens=overlap).validate()
            tts.stream_config = cfg
            short = hop + overlap + 60
            sentences = texts(args.reps + 1, seed=1000 + n)
            stream_request(tts, sentences[0], VOICE, short, seed=500 + n)       # captures this config's windows
            firsts = [stream_request(tts, t, VOICE, short, seed=600 + i)["first_audio_ms"]
                      for i, t in enumerate(sentences[1:])]
            streamed = torch.cat([c.float() for c in tts.decoder.stream([[t] for t in tokens], prompt, seed=3,
                                                                         config=cfg)]).cpu().numpy()
            row = dict(first_hop_tokens=hop, overlap_tokens=overlap, first_audio_ms=median(firsts),
                       first_audio_all_ms=firsts, snr_first_second_db=snr_db(offline[:second], streamed[:second]),
                       snr_whole_db=snr_db(offline, streamed), samples_equal=int(offline.size == streamed.size))
            rows.append(row)
            log(f"first window {hop}+{overlap}: first audio {row['first_audio_ms']:.1f} ms (median of {len(firsts)}), "
                f"SNR vs offline {row['snr_first_second_db']:.1f} dB first second, {row['snr_whole_db']:.1f} dB whole")
    finally:
        tts.stream_config = keep
        res["first_windows"] = rows


# ----------------------------------------------------------------------------- official
def official_model_folder(model: str, dest: str) -> str:
    """A folder HF loads with trust_remote_code: the released config plus auto_map, the remote code
    from .official/, links to the weights (nothing of the official code is in this repository)."""
    missing = [f for f in OFFICIAL_FILES if not os.path.exists(os.path.join(OFFICIAL_CODE, f))]
    if missing:
        raise FileNotFoundError(f"{OFFICIAL_CODE} lacks {missing}: put the HF remote code of "
                                "stepfun-ai/Step-Audio-TTS-3B there (ignored by git) or pass --skip-official")
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoConfig": "configuration_step1.Step1Config",
                          "AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM"}
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for f in OFFICIAL_FILES:
        shutil.copy(os.path.join(OFFICIAL_CODE, f), dest)
    for f in os.listdir(model):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            link = os.path.join(dest, f)
            if not os.path.lexists(link):
                os.symlink(os.path.join(model, f), link)
    return dest


def run_official(args, folders: dict, device: str, prompt: list[int], workdir: str, res: dict) -> None:
    """The official LM in its own process, so its transformers pin stays out of ours."""
    spec = dict(model=official_model_folder(folders["model"], os.path.join(workdir, "official-model")),
                device=device, prompt=prompt, log_start=START, tokens=args.tokens, reps=args.official_reps,
                result=os.path.join(workdir, "official.json"))
    spec_path = os.path.join(workdir, "official-spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    # offline (no network on the device); HF_HOME here: trust_remote_code copies the code under it
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               HF_HOME=os.path.join(workdir, "hf-home"))
    if args.official_site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.official_site, env.get("PYTHONPATH")) if p)
    log(f"official path: subprocess (transformers from {args.official_site or 'this environment'})")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--official-worker", spec_path], env=env,
                          timeout=args.official_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the official worker exited with {proc.returncode}")
    with open(spec["result"]) as f:
        res["official"].update(json.load(f))


def official_worker(spec_path: str) -> None:
    """Runs in the subprocess: load as the official tts.py does, generate as it does, report times."""
    global START
    with open(spec_path) as f:
        spec = json.load(f)
    START = spec["log_start"]          # one clock for all processes (CLOCK_MONOTONIC): log on the parent's times
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class RepetitionAware(LogitsProcessor):
        """The official sampling rule (SPEC §7.4): a token that is at least twice in the last 10 may
        not come next."""

        def __call__(self, input_ids, scores):
            window = input_ids[:, -10:]
            if window.shape[1] < 10:
                return scores
            last = window[:, -1:]
            banned = (window == last).sum(dim=1) >= 2
            scores[banned, last[banned, 0]] = float("-inf")
            return scores

    device = spec["device"]
    optimus = hasattr(torch.ops, "Optimus") and hasattr(torch.ops.Optimus, "fwd")
    out = {"transformers": transformers.__version__,
           "attention": "Optimus flash attention" if optimus else
           "SDPA with the sqrt-ALiBi mask built per layer and step (the official code's fallback)"}
    sync(device)
    t0 = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.bfloat16, device_map=device,
                                                       trust_remote_code=True, output_loading_info=True)
    sync(device)
    out["load_s"] = time.perf_counter() - t0
    out["loading_info"] = {k: sorted(map(str, v))[:10] for k, v in info.items() if v}
    log(f"official: model loaded in {out['load_s']:.1f} s (transformers {transformers.__version__}; "
        f"loading issues: {out['loading_info'] or 'none'})")
    ids = torch.tensor([spec["prompt"]], dtype=torch.long, device=device)

    def generate(n: int, seed: int) -> tuple[list[int], float]:
        torch.manual_seed(seed)
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.7,
                                 top_k=50, logits_processor=LogitsProcessorList([RepetitionAware()]))
        sync(device)
        return seq[0, ids.shape[1]:].tolist(), time.perf_counter() - t

    _, out["warmup_8_tokens_s"] = generate(8, 0)
    log(f"official: warm-up generate (8 tokens) {out['warmup_8_tokens_s']:.2f} s")
    times = []
    for rep in range(spec["reps"]):
        tokens, seconds = generate(spec["tokens"], 1 + rep)
        times.append(seconds)
        log(f"official: generate {len(tokens)} tokens in {seconds:.2f} s ({seconds / len(tokens) * 1e3:.1f} ms/token)")
    out.update(generate_s=times, generate_median_s=median(times), new_tokens=len(tokens), tokens=tokens,
               prompt_tokens=ids.shape[1])
    with open(spec["result"], "w") as f:
        json.dump(out, f)


def time_official_decode(tts, tokens: list[int], device: str, reps: int, res: dict) -> None:
    """Our offline token2wav of the official LM's tokens with the same voice: a lower bound for the
    official decoder (CosyVoice's flow + HiFT in fp32, eager)."""
    from stepvox.engine.pipelines.tts_text import AudioTokenFilter
    flow_tokens = AudioTokenFilter().push(tokens)          # speech ids, whole 5-token groups
    log(f"official decode stand-in: our token2wav of its {len(flow_tokens)} speech tokens ...")
    prompt = tts.voice_registry.get(VOICE).prompt
    times, samples = [], 0
    with torch.inference_mode():
        for rep in range(reps + 1):                        # the first captures graphs for this length
            sync(device)
            t0 = time.perf_counter()
            wav = tts.decoder.token2wav(flow_tokens, prompt=prompt, seed=rep)
            sync(device)
            if rep:
                times.append((time.perf_counter() - t0) * 1e3)
            samples = wav.numel()
    out = res["official"]
    out.update(decode_tokens=len(flow_tokens), decode_lower_bound_ms=median(times), decode_ms=times,
               decode_samples=samples, audio_s=samples / tts.sample_rate)
    out["first_audio_s"] = out["generate_median_s"] + out["decode_lower_bound_ms"] / 1e3
    log(f"official decode stand-in (our token2wav, {len(flow_tokens)} tokens): {out['decode_lower_bound_ms']:.0f} ms")


# ----------------------------------------------------------------------------- report
def table(res: dict) -> list[dict]:
    ours, off = res.get("ours", {}), res.get("official", {})

    def ms(v):
        return f"{v:.1f} ms" if isinstance(v, (int, float)) else "-"

    def sec(v):
        return f"{v:.2f} s" if isinstance(v, (int, float)) else "-"

    def rtf(v):
        return f"RTF {v:.4f}" if isinstance(v, (int, float)) else "RTF -"

    warm = [round(w["first_audio_ms"], 1) for w in ours.get("warm", [])]
    rows = [
        dict(metric="device / date (UTC)", value=f"{res['device']} / {res['date']}"),
        dict(metric="prompt tokens (voice's first request; official) / audio tokens per request",
             value=f"{ours.get('prompt_tokens', '-')}; {off.get('prompt_tokens', '-')} / {res['tokens']}"),
        dict(metric="folders written (s)", value=sec(res.get("write_folders_s")) if "write_folders_s" in res
             else "reused"),
        dict(metric="ours: TTS.from_pretrained", value=sec(ours.get("load_s"))),
        dict(metric="ours: engine's first request, first audio / total",
             value=f"{ms(ours.get('engine_first_request', {}).get('first_audio_ms'))} / "
                   f"{ms(ours.get('engine_first_request', {}).get('total_ms'))}"),
        dict(metric=f"ours: register voice ({ours.get('voice_seconds', 0):.1f} s reference)",
             value=ms(ours.get("register_voice_ms"))),
        dict(metric="ours: first audio, voice's first request (cold)", value=ms(ours.get("cold", {}).get("first_audio_ms"))),
        dict(metric=f"ours: first audio, warm (median of {len(warm)})", value=f"{ms(ours.get('warm_first_audio_ms'))} {warm}"),
        dict(metric="ours: stream total, warm (median)", value=f"{ms(ours.get('warm_total_ms'))} for "
             f"{sec(ours.get('audio_s'))} of audio, {rtf(ours.get('warm_rtf'))}"),
        dict(metric="ours: synthesize() end to end (median)", value=f"{ms(ours.get('synthesize_ms'))}, {rtf(ours.get('synthesize_rtf'))}"),
    ]
    if off:
        rows += [
            dict(metric=f"official: transformers {off.get('transformers', '?')}, from_pretrained",
                 value=sec(off.get("load_s"))),
            dict(metric=f"official: generate {off.get('new_tokens', '-')} tokens (median of "
                        f"{len(off.get('generate_s', []))})",
                 value=f"{sec(off.get('generate_median_s'))}"
                       + (f", {off['generate_median_s'] / off['new_tokens'] * 1e3:.1f} ms/token"
                          if off.get("new_tokens") else "")),
            dict(metric="official: decoder, lower bound (our token2wav of its tokens)",
                 value=ms(off.get("decode_lower_bound_ms"))),
            dict(metric="official: first audio = whole utterance", value=sec(off.get("first_audio_s"))),
        ]
        if off.get("first_audio_s") and ours.get("warm_first_audio_ms"):
            rows.append(dict(metric="official first audio / ours (warm)",
                             value=f"{off['first_audio_s'] * 1e3 / ours['warm_first_audio_ms']:.1f}x"))
        if "decode_samples" in off and ours.get("warm"):
            rows.append(dict(metric="same token count: official new tokens == requested, audio length equal",
                             value=f"{off.get('new_tokens') == res['tokens']}, "
                                   f"{off['decode_samples'] == ours['warm'][0]['samples']}"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny folders on the CPU, few tokens and reps")
    ap.add_argument("--out", default=None, help="folder for tts.json (default $OUT, else ./out)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="audio tokens per request (default 415 = 83 groups = 9.96 s of audio; smoke 40)")
    ap.add_argument("--reps", type=int, default=None, help="warm requests and synthesize() calls (default 5; smoke 2)")
    ap.add_argument("--official-reps", type=int, default=None, help="official generate() runs (default 2; smoke 1)")
    ap.add_argument("--skip-official", action="store_true")
    ap.add_argument("--official-site", default=os.environ.get("STEPVOX_OFFICIAL_SITE"),
                    help="folder with transformers 4.48.3 and its pins unpacked (pip --target), put first on the "
                         "official subprocess's PYTHONPATH; default: this environment's transformers")
    ap.add_argument("--official-timeout", type=float, default=360.0, help="seconds for the official subprocess")
    ap.add_argument("--voice-seconds", type=float, default=None, help="reference length (default 6; smoke 3)")
    ap.add_argument("--folders", default=None, help="write the folders here, or reuse them if a run completed them")
    ap.add_argument("--keep", action="store_true", help="keep the folders written to a temporary directory")
    ap.add_argument("--first-windows", default=None,
                    help="first-chunk sweep over decoder stream configs 'hop+overlap,...' in tokens, multiples of 5 "
                         "(e.g. 15+20,10+10,5+10,5+5); default: no sweep")
    args = parse_args_or_work(ap, official_worker=official_worker)
    if args is None:
        return
    if args.out:
        os.environ["OUT"] = args.out
    smoke = args.smoke or not torch.cuda.is_available()
    device = "cpu" if smoke else "cuda"
    args.tokens = args.tokens or (40 if smoke else 415)
    args.reps = args.reps or (2 if smoke else 5)
    args.official_reps = args.official_reps or (1 if smoke else 2)
    res = dict(device=device_name() if device == "cuda" else "cpu", torch=torch.__version__, smoke=smoke,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), tokens=args.tokens,
               ours={}, official={})
    root = args.folders or tempfile.mkdtemp(prefix="stepvox-bench-tts-")
    workdir = tempfile.mkdtemp(prefix="stepvox-bench-tts-work-")
    log(f"{res['device']}, {args.tokens} audio tokens a request, folders in {root}")

    def section(name, fn):
        """Run one part; its failure is recorded, and the JSON is rewritten after each part, so a
        run cut short by the device's time limit still leaves what it measured."""
        out = guarded(res, name, fn)
        res["table"] = table(res)
        write_json("tts.json", res)
        return out

    tts = None
    try:
        folders = section("folders", lambda: prepare_folders(root, smoke, device, res))
        if folders is None:
            return
        from stepvox.engine.pipelines.tts import TTS
        log("TTS.from_pretrained ...")
        t0 = time.perf_counter()
        # the official process needs room on the same GPU (half of it is plenty at concurrency 1);
        # only the batch-1 decode graph is replayed here, so fewer graph sizes shorten the start
        engine_args = (dict(kernel_backend="reference", max_model_len=2048, num_kv_pages=256) if smoke
                       else dict(gpu_memory_utilization=0.5, cuda_graph_max_batch=16))
        tts = section("load", lambda: TTS.from_pretrained(folders["model"], folders["tokenizer"], folders["speakers"],
                                                          device=device, **engine_args))
        if tts is None:
            return
        res["ours"]["load_s"] = time.perf_counter() - t0
        log(f"TTS.from_pretrained: {res['ours']['load_s']:.1f} s")
        sentences = texts(2 + 2 * args.reps)
        ref = reference_voice(args.voice_seconds or (3.0 if smoke else 6.0), workdir)
        section("ours", lambda: run_ours(tts, args, sentences, ref, res))
        if args.first_windows and VOICE in tts.voices():
            section("first windows", lambda: run_first_windows(tts, args, res))
        if not args.skip_official and VOICE in tts.voices():
            prompt = tts.prompt_token_ids(sentences[2], VOICE)      # the first warm request's prompt
            ran = section("official", lambda: run_official(args, folders, device, prompt, workdir, res) or True)
            if ran:
                section("official decode", lambda: time_official_decode(tts, res["official"]["tokens"], device,
                                                                        args.reps, res))
    finally:
        if tts is not None:
            tts.shutdown()
        res["official"].pop("tokens", None)
        res["table"] = table(res)
        path = write_json("tts.json", res)
        print(f"\nTTS pipeline on {res['device']} ({'tiny folders' if smoke else 'random weights, released shapes'}); "
              f"JSON: {path}")
        if res.get("errors"):
            print("FAILED SECTIONS:", {k: v[:300] for k, v in res["errors"].items()})
        print_table(res["table"], ["metric", "value"])
        if res.get("first_windows"):
            print_table([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                          if k != "first_audio_all_ms"} for r in res["first_windows"]],
                        ["first_hop_tokens", "overlap_tokens", "first_audio_ms", "snr_first_second_db",
                         "snr_whole_db", "samples_equal"])
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.folders and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not args.folders:
            print(f"folders kept in {root} (reuse with --folders {root})")


if __name__ == "__main__":
    main()
