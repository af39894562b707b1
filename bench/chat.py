"""Voice chat latency on one GPU: from the end of a spoken question to the first audio of the answer,
split into its phases, with random weights of the released shapes.

Folders: bench/tts.py's (Step-Audio-TTS-3B, its CosyVoice decoders, Step-Audio-Tokenizer, speakers)
and a chat stand-in of the TTS-3B shape (the 130B Step-Audio-Chat does not fit one card in bf16).
Questions: real speech from the official repository's examples (../shared/data/step-audio/examples,
or the copies in the ignored .data/ folder that a device call carries).

Random weights write noise, and a noisy answer has no sentence ends, so the chat model's answer is
scripted: a logits processor on the device forces the ids of a fixed two-sentence answer (the
script's cost is in the chat row: compare the chat model's free-running decode row). Each request:
VoiceChat.respond([system, user audio], voice="Tingting") with the official sampling otherwise,
consumed to its end. Phases (medians over --reps after one warm-up request per question):

  tokenize        call -> prompt ready (audio decoded, both tokenizers, template, ids)
  chat prefill    -> the chat model's first token
  first sentence  -> the first sentence complete (its tokens decoded one by one)
  TTS first audio -> the TTS's first chunk of that sentence (prefill, look-ahead tokens, decoder window)
  end to end      the sum: end of the question to the first answer audio (goal <= 300 ms)

Every request has a system prompt of its own, so none is served from the prefix cache.

Also: the chat model's decode ms/token free-running (no script), and a second turn's prefill in a
conversation that keeps the first (prefix cache). JSON to $OUT/chat.json (or --out DIR).

    python bench/chat.py --folders /tmp/chat-folders      # on the GPU
    python bench/chat.py --smoke                          # tiny folders on the CPU: catches errors
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:          # the CPU run: Triton must hear of its interpreter before it is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from _util import device_name, guarded, print_table, write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ("multilingual1.wav", "prompt_wav_lixueqin.wav", "speed_control1.wav")
QUESTION_DIRS = (os.path.join(REPO, ".data"), os.path.join(REPO, "..", "shared", "data", "step-audio", "examples"))
SYSTEM = "适配用户的语言，用简短口语化的文字回答"
ANSWER = "你好，很高兴认识你。今天天气很好，我们可以一起出去走走。"
PHASES = ("tokenize", "chat prefill", "first sentence", "TTS first audio")
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def median(values):
    return statistics.median(values) if values else None


class ScriptedAnswer:
    """Forces the ids of `text` (as they follow "assistant\\n"), then the end of turn."""

    def __init__(self, tokenizer, text: str):
        newline = len(tokenizer.encode("\n"))
        self.ids = tokenizer.encode("\n" + text)[newline:] + [tokenizer.eot_id]
        self._table = None

    def __call__(self, output_ids, logits):
        if self._table is None or self._table.device != logits.device:
            self._table = torch.tensor(self.ids, device=logits.device)
        forced = torch.full_like(logits, float("-inf"))
        forced[self._table[min(len(output_ids), len(self.ids) - 1)]] = 0.0
        return forced


def prepare(root: str, smoke: bool, device: str, res: dict) -> dict:
    """bench/tts.py's folders plus the chat stand-in, written once (reused when complete)."""
    marker = os.path.join(root, "chat-bench-complete.json")
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("smoke") == smoke:
            log(f"reusing the folders in {root}")
            return done["paths"]
    from tts import prepare_folders, write_lm_3b
    t0 = time.perf_counter()
    paths = dict(prepare_folders(root, smoke, device, res))
    chat = os.path.join(root, "chat-stand-in")
    if smoke:
        from stepvox.testing.step1 import write_random_step1
        write_random_step1(chat, seed=7)
    else:
        log("writing the chat stand-in (TTS-3B shape, 7.06 GB)")
        write_lm_3b(chat, device, audio_head_scale=1.0)
    paths["chat"] = chat
    res["write_folders_s"] = time.perf_counter() - t0
    with open(marker, "w") as f:
        json.dump({"smoke": smoke, "paths": paths}, f)
    return paths


def questions(paths: list[str] | None, smoke: bool, workdir: str) -> list[tuple[str, np.ndarray, int]]:
    found = []
    for name in QUESTIONS if not paths else paths:
        candidates = [name] if os.path.isabs(name) else [os.path.join(d, name) for d in QUESTION_DIRS]
        for path in candidates:
            if os.path.exists(path):
                wav, rate = sf.read(path, dtype="float32", always_2d=True)
                found.append((os.path.basename(path), wav.mean(axis=1), rate))
                break
    if not found:                       # no real speech here: espeak-ng, or a synthetic voice
        from stepvox.testing.speech import espeak_wav
        wav, rate = espeak_wav(os.path.join(workdir, "q.wav"), "what is the weather like today")
        found.append(("espeak.wav", wav.astype(np.float32), rate))
    return found[:1] if smoke else found


def audio_message(wav: np.ndarray, rate: int) -> dict:
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav, "sample_rate": rate}}]}


def phases(timings: dict) -> dict:
    t = timings
    return {"tokenize": t["prompt_ready"] * 1e3, "chat prefill": (t["first_token"] - t["prompt_ready"]) * 1e3,
            "first sentence": (t["first_sentence"] - t["first_token"]) * 1e3,
            "TTS first audio": (t["first_audio"] - t["first_sentence"]) * 1e3, "end to end": t["first_audio"] * 1e3}


def run_requests(chat, args, qs, res: dict, tag: str = "") -> None:
    from stepvox.engine.pipelines.voice_chat import ResponseDone
    from stepvox.engine.sampling_params import SamplingParams
    script = ScriptedAnswer(chat.tokenizer, ANSWER)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=len(script.ids) + 8,
                            logits_processors=[script])
    rows = []
    for name, wav, rate in qs:
        per = []
        for rep in range(args.reps + 1):        # the first is a warm-up (new prompt lengths, decoder buckets)
            # a system prompt of its own per request: nothing comes from the prefix cache (a deployment
            # would have its system prompt cached; the question's audio is new every time anyway)
            messages = [{"role": "system", "content": f"[{name} {rep}{tag}] {SYSTEM}"}, audio_message(wav, rate)]
            done = [e for e in chat.respond(messages, chat_params=params) if isinstance(e, ResponseDone)][0]
            if rep:
                per.append(dict(phases(done.timings), prompt_tokens=done.usage.prompt_tokens,
                                cached_tokens=done.usage.cached_tokens, audio_s=done.audio_seconds,
                                total_ms=done.timings["done"] * 1e3, sentences=len(done.sentences)))
            log(f"{name} rep {rep}: first audio {done.timings['first_audio'] * 1e3:.1f} ms "
                f"({', '.join(f'{k} {v:.1f}' for k, v in phases(done.timings).items())}); "
                f"prompt {done.usage.prompt_tokens} (cached {done.usage.cached_tokens})")
        row = dict(question=name, seconds=round(wav.size / rate, 2), prompt_tokens=per[-1]["prompt_tokens"])
        for key in (*PHASES, "end to end", "total_ms", "audio_s"):
            row[key] = median([p[key] for p in per])
        row["cached_tokens"] = median([p["cached_tokens"] for p in per])
        row["runs"] = per
        rows.append(row)
    res["requests"] = rows


def run_first_windows(chat, args, qs, res: dict) -> None:
    """The same requests with other first decoder windows (the TTS stream's first hop + overlap): the
    TTS's first audio is most of the end-to-end figure, and its first window is its main lever."""
    from stepvox.engine.audio.decoder_stream import StreamConfig
    from tts import parse_first_windows
    keep = chat.tts.stream_config
    out = []
    try:
        for hop, overlap in parse_first_windows(args.first_windows):
            chat.tts.stream_config = StreamConfig(first_hop_tokens=hop, overlap_tokens=overlap).validate()
            sub: dict = {}
            run_requests(chat, args, qs, sub, tag=f" {hop}+{overlap}")    # new system prompts: no cache hits
            rows = [{k: v for k, v in r.items() if k != "runs"} for r in sub["requests"]]
            out.append(dict(first_hop_tokens=hop, overlap_tokens=overlap, requests=sub["requests"],
                            end_to_end_ms=median([r["end to end"] for r in rows]),
                            tts_first_audio_ms=median([r["TTS first audio"] for r in rows])))
            log(f"first window {hop}+{overlap}: end to end {out[-1]['end_to_end_ms']:.1f} ms "
                f"(TTS first audio {out[-1]['tts_first_audio_ms']:.1f} ms), median over the questions")
    finally:
        chat.tts.stream_config = keep
        res["first_windows"] = out


def run_free_decode(chat, args, res: dict) -> None:
    """The chat model's own decode speed (no script): text only, a fixed token count."""
    from stepvox.engine.pipelines.voice_chat import ResponseDone
    from stepvox.engine.sampling_params import SamplingParams
    n = 16 if args.smoke else 256
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=n, ignore_eos=True)
    times = []
    for rep in range(3):
        done = [e for e in chat.respond([{"role": "user", "content": "你好"}], audio=False, chat_params=params)
                if isinstance(e, ResponseDone)][0]
        t = done.timings
        times.append((t["text_done"] - t["first_token"]) / max(done.usage.completion_tokens - 1, 1) * 1e3)
    res["free_decode_ms_per_token"] = median(times)
    log(f"chat model free-running decode: {res['free_decode_ms_per_token']:.2f} ms/token")


def run_second_turn(chat, qs, res: dict) -> None:
    """Two spoken turns in one conversation: the second prefills only its new tokens."""
    from stepvox.engine.pipelines.voice_chat import ResponseDone
    from stepvox.engine.sampling_params import SamplingParams
    script = ScriptedAnswer(chat.tokenizer, ANSWER)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=len(script.ids) + 8,
                            logits_processors=[script])
    talk = chat.conversation(system=SYSTEM)
    out = []
    for name, wav, rate in (qs * 2)[:2]:
        done = [e for e in talk.say(audio_message(wav, rate)["content"], chat_params=params)
                if isinstance(e, ResponseDone)][0]
        out.append(dict(question=name, prompt_tokens=done.usage.prompt_tokens, cached_tokens=done.usage.cached_tokens,
                        **{k: round(v, 1) for k, v in phases(done.timings).items()}))
        log(f"conversation turn {len(out)}: prompt {done.usage.prompt_tokens}, cached {done.usage.cached_tokens}, "
            f"chat prefill {out[-1]['chat prefill']:.1f} ms")
    res["conversation"] = out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny folders on the CPU")
    ap.add_argument("--folders", default=None, help="write the folders here, or reuse them")
    ap.add_argument("--reps", type=int, default=None, help="requests per question after the warm-up (default 5; smoke 1)")
    ap.add_argument("--question", action="append", default=None, help="a question wav (repeatable)")
    ap.add_argument("--out", default=None, help="folder for chat.json (default $OUT, else ./out)")
    ap.add_argument("--first-windows", default=None,
                    help="also time the requests with these first decoder windows of the TTS stream, 'hop+overlap,...' "
                         "in tokens (multiples of 5, e.g. 10+10,5+10,5+5), after the default one")
    args = ap.parse_args()
    if args.out:
        os.environ["OUT"] = args.out
    args.smoke = args.smoke or not torch.cuda.is_available()
    device = "cpu" if args.smoke else "cuda"
    args.reps = args.reps or (1 if args.smoke else 5)
    res = dict(device=device_name() if device == "cuda" else "cpu", torch=torch.__version__, smoke=args.smoke,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), answer=ANSWER)
    root = args.folders or tempfile.mkdtemp(prefix="stepvox-bench-chat-")
    workdir = tempfile.mkdtemp(prefix="stepvox-bench-chat-work-")
    chat = None
    try:
        paths = guarded(res, "folders", lambda: prepare(root, args.smoke, device, res))
        if paths is None:
            return
        from stepvox.engine.pipelines.voice_chat import VoiceChat
        engine = (dict(kernel_backend="reference", max_model_len=2048, num_kv_pages=512) if args.smoke
                  else dict(cuda_graph_max_batch=16))
        t0 = time.perf_counter()
        log("VoiceChat.from_pretrained ...")
        chat = guarded(res, "load", lambda: VoiceChat.from_pretrained(
            paths["chat"], paths["model"], paths["tokenizer"], paths["speakers"], device=device, asr=False,
            chat_engine_args=engine, tts_engine_args=engine))
        if chat is None:
            return
        res["load_s"] = time.perf_counter() - t0
        log(f"loaded in {res['load_s']:.1f} s")
        qs = questions(args.question, args.smoke, workdir)
        guarded(res, "requests", lambda: run_requests(chat, args, qs, res))
        if args.first_windows:
            guarded(res, "first windows", lambda: run_first_windows(chat, args, qs, res))
        guarded(res, "free decode", lambda: run_free_decode(chat, args, res))
        guarded(res, "conversation", lambda: run_second_turn(chat, qs, res))
    finally:
        if chat is not None:
            chat.shutdown()
        path = write_json("chat.json", res)
        print(f"\nVoice chat on {res['device']} ({'tiny folders' if args.smoke else 'random weights, released shapes'},"
              f" chat stand-in of the 3B shape); JSON: {path}")
        if res.get("errors"):
            print("FAILED SECTIONS:", {k: str(v)[:300] for k, v in res["errors"].items()})
        rows = [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "runs"}
                for r in res.get("requests", [])]
        if rows:
            print_table(rows, ["question", "seconds", "prompt_tokens", *PHASES, "end to end", "total_ms", "audio_s"])
        if "free_decode_ms_per_token" in res:
            print(f"chat model free-running decode: {res['free_decode_ms_per_token']:.2f} ms/token")
        for w in res.get("first_windows", []):
            print(f"first window {w['first_hop_tokens']}+{w['overlap_tokens']}: end to end {w['end_to_end_ms']:.1f} ms, "
                  f"TTS first audio {w['tts_first_audio_ms']:.1f} ms (median over the questions)")
        for turn in res.get("conversation", []):
            print(f"conversation: {turn}")
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.folders:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
