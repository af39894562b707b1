"""Real-time dialogue latency on one GPU: RealtimeSession over a VoiceChat (bench/chat.py's folders:
random weights of the released shapes, a chat stand-in of the TTS-3B shape), fed recorded speech at
real-time pace in 20 ms frames, with speculation on and off in the same run.

The user side: real speech from the official examples (.data/ copies or ../shared/data/step-audio/
examples), each question once in one piece and once cut in two with a 300 ms pause inside (shorter
than the commit: the speculation started there must be discarded), then silence until the answer
has played (the TTS capped at 60 tokens, 1.4 s, a sentence, to keep the run short). Then each
question once more, its answer uncapped and talked over (barge-in) 300 ms after its first audio,
while it is still being generated. The chat answer is scripted as in bench/chat.py.

Reported, speculation on and off: end of speech (the VAD's first silent frame after a committed
turn) to the answer's first audio leaving the session (p50 / p90; wall time, the feed running in
real time), the same from the end of the voice (the turn's last 10 ms frame within 30 dB of its
loudest, as fed: what the user waits for; it includes Silero's hangover after the voice),
speculations promoted / discarded and the text pieces wasted, barge-in stop (speech detected to
the answer's generation stopped, inside the session) and barge-in from the voice (the first 10 ms of
the interrupting clip within 30 dB of its loudest, as fed in real time, to the same stop: what the
user waits for; it includes the VAD's min_speech_ms). Goal: p50 <= commit_ms + 50 ms with
speculation on; barge-in stop <= 100 ms. JSON to $OUT/realtime.json.

    python bench/realtime.py --folders /tmp/f        # on the GPU (reuses bench/chat.py's folders)
    python bench/realtime.py --smoke                 # tiny folders on the CPU
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import datetime  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _util import device_name, guarded, print_table, write_json  # noqa: E402
from chat import ANSWER, ScriptedAnswer, prepare, questions  # noqa: E402

FRAME = 320                                # 20 ms at 16 kHz


def voice_bounds_s(audio: np.ndarray) -> tuple[float, float]:
    """Where the voice starts and ends in a clip: its first and last 10 ms frames with an RMS within
    30 dB of the loudest frame's (recordings have some silence of their own at both ends)."""
    frames = audio[:audio.size // 160 * 160].reshape(-1, 160)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    loud = np.flatnonzero(rms >= 0.03 * rms.max())
    return float(loud[0]) * 0.01, float(loud[-1] + 1) * 0.01


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def to16k(wav: np.ndarray, rate: int) -> np.ndarray:
    from stepvox.engine.frontend.resample import resample
    return resample(torch.from_numpy(wav.astype(np.float32)), rate, 16000).numpy()


async def feed_realtime(session, audio: np.ndarray) -> None:
    """Frames at the pace a microphone gives them."""
    start = time.monotonic()
    for k, i in enumerate(range(0, audio.size, FRAME)):
        await session.append(audio[i:i + FRAME])
        delay = start + (k + 1) * FRAME / 16000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def run_mode(chat, qs, speculate: bool, args) -> dict:
    from stepvox.engine.pipelines.realtime import (RealtimeSession, ResponseAudio, ResponseFinished,
                                                   ResponseTruncated, TurnDetection)
    from stepvox.engine.sampling_params import SamplingParams
    script = ScriptedAnswer(chat.tokenizer, ANSWER)
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_tokens=len(script.ids) + 8,
                            logits_processors=[script])
    detection = TurnDetection(pause_ms=args.pause_ms, commit_ms=args.commit_ms, speculate=speculate)
    session = RealtimeSession(chat, system="适配用户的语言，用简短口语化的文字回答", detection=detection,
                              respond_options=dict(chat_params=params, tts_max_tokens=60), max_turns=4)
    silence = lambda ms: np.zeros(int(ms * 16), np.float32)       # noqa: E731
    turns = []
    for name, wav, rate in qs:
        speech = to16k(wav, rate)
        half = speech.size // 2
        turns.append(np.concatenate([silence(300), speech, silence(args.commit_ms + 200)]))
        turns.append(np.concatenate([silence(300), speech[:half], silence(300), speech[half:],
                                     silence(args.commit_ms + 200)]))

    async def until_done():
        while True:
            event = await session.events.get()
            if isinstance(event, (ResponseFinished, ResponseTruncated)):
                return event

    from_voice = []
    for turn in turns:
        start = time.monotonic()
        voice_end = start + voice_bounds_s(turn)[1]
        feeder = asyncio.create_task(feed_realtime(session, turn))
        first = done = None
        while done is None:
            event = await asyncio.wait_for(session.events.get(), 120)
            if isinstance(event, ResponseAudio) and first is None:
                first = time.monotonic()
            elif isinstance(event, (ResponseFinished, ResponseTruncated)):
                done = event
        await feeder
        from_voice.append(round((first - voice_end) * 1e3, 1))
        await feed_realtime(session, silence(done.played_ms + 200))       # the user listens to the answer
    # barge-in, once per question: the answer uncapped (18 s of audio, still being generated when the
    # user talks over it 300 ms after its first audio); the interrupting words are then dropped
    # (clear), so the next question starts from silence
    session.respond_options.pop("tts_max_tokens", None)
    interrupted, heard_ms = 0, []
    for name, wav, rate in qs:
        speech = to16k(wav, rate)
        await feed_realtime(session, np.concatenate([silence(300), speech, silence(args.commit_ms + 100)]))
        while not isinstance(await session.events.get(), ResponseAudio):
            pass
        words = speech[:16000]
        feeder = asyncio.create_task(feed_realtime(session, np.concatenate([silence(300), words])))
        onset = time.monotonic() + 0.3 + voice_bounds_s(words)[0]      # when the user's voice starts
        stopped = None
        while stopped is None:
            event = await asyncio.wait_for(session.events.get(), 10)
            if isinstance(event, (ResponseFinished, ResponseTruncated)):
                stopped = time.monotonic()
                if isinstance(event, ResponseFinished) and event.interrupted:
                    interrupted += 1
                    heard_ms.append(round((stopped - onset) * 1e3, 1))
        await feeder
        await session.clear()
        while not session.events.empty():
            session.events.get_nowait()
        await feed_realtime(session, silence(300))
    await session.close()
    st = session.stats
    first = st["end_of_speech_to_first_audio_s"]
    return dict(speculate=speculate, turns=len(turns) + len(qs), interrupted=interrupted,
                from_voice_p50_ms=percentile(from_voice, 50), from_voice_p90_ms=percentile(from_voice, 90),
                from_voice_ms=from_voice, first_audio_p50_ms=percentile(first, 50) * 1e3,
                first_audio_p90_ms=percentile(first, 90) * 1e3, first_audio_ms=[round(x * 1e3, 1) for x in first],
                promoted=st["promoted"], discarded=st["discarded"], wasted_text_deltas=st["wasted_text_deltas"],
                barge_in_stop_ms=[round(x * 1e3, 1) for x in st["barge_in_stop_s"]],
                barge_in_from_voice_ms=heard_ms)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--folders", default=None)
    ap.add_argument("--pause-ms", type=int, default=200)
    ap.add_argument("--commit-ms", type=int, default=600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.out:
        os.environ["OUT"] = args.out
    args.smoke = args.smoke or not torch.cuda.is_available()
    device = "cpu" if args.smoke else "cuda"
    res = dict(device=device_name() if device == "cuda" else "cpu", smoke=args.smoke, pause_ms=args.pause_ms,
               commit_ms=args.commit_ms, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))
    root = args.folders or tempfile.mkdtemp(prefix="stepvox-bench-realtime-")
    chat = None
    try:
        paths = guarded(res, "folders", lambda: prepare(root, args.smoke, device, res))
        from stepvox.engine.pipelines.voice_chat import VoiceChat
        engine = (dict(kernel_backend="reference", max_model_len=2048, num_kv_pages=512) if args.smoke
                  else dict(cuda_graph_max_batch=16))
        chat = VoiceChat.from_pretrained(paths["chat"], paths["model"], paths["tokenizer"], paths["speakers"],
                                         device=device, asr=False, chat_engine_args=engine, tts_engine_args=engine)
        qs = questions(None, args.smoke, tempfile.mkdtemp())
        loop = chat.sync_loop()
        res["modes"] = []
        # one question through every path first (uncounted): the first requests after loading
        # capture graphs for their lengths
        guarded(res, "warm-up", lambda: asyncio.run_coroutine_threadsafe(run_mode(chat, qs[:1], True, args),
                                                                          loop).result())
        for speculate in (True, False):
            out = guarded(res, f"speculate={speculate}",
                          lambda: asyncio.run_coroutine_threadsafe(run_mode(chat, qs, speculate, args), loop).result())
            if out:
                res["modes"].append(out)
    finally:
        if chat is not None:
            chat.shutdown()
        path = write_json("realtime.json", res)
        print(f"\nReal-time sessions on {res['device']}; JSON: {path}")
        if res.get("errors"):
            print("FAILED SECTIONS:", {k: str(v)[:300] for k, v in res["errors"].items()})
        rows = [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in m.items()
                 if k not in ("first_audio_ms", "from_voice_ms")}
                for m in res.get("modes", [])]
        if rows:
            print_table(rows, ["speculate", "turns", "first_audio_p50_ms", "first_audio_p90_ms", "from_voice_p50_ms",
                               "from_voice_p90_ms", "promoted",
                               "discarded", "wasted_text_deltas", "interrupted", "barge_in_stop_ms",
                               "barge_in_from_voice_ms"])


if __name__ == "__main__":
    main()
