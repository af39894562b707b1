"""The real-time controller on tiny random folders: espeak-ng speech joined with silences of chosen
lengths, fed in 20 ms frames (faster than real time: the session's clock is the audio it was
given). A long pause commits the speculative answer without starting another; a short pause
discards the speculation and frees its pages; speech over an answer is a barge-in that keeps only
the played sentences in the history. The chat model's answer is scripted (random weights write no
sentence ends)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from stepvox.engine.errors import ConfigError, TurnStateError
from stepvox.engine.frontend.resample import resample
from stepvox.engine.pipelines.realtime import (RealtimeSession, ResponseAudio, ResponseFinished, ResponseStarted,
                                               ResponseText, ResponseTruncated, SpeechStarted, SpeechStopped,
                                               TurnCommitted, TurnDetection, UserTranscript)
from stepvox.engine.pipelines.voice_chat import VoiceChat
from stepvox.engine.sampling_params import SamplingParams
from stepvox.testing.speech import espeak_wav
from stepvox.testing.step1 import write_random_step1
from stepvox.testing.tts import write_tts_folders

ENGINE = dict(kernel_backend="reference", max_model_len=2048, num_kv_pages=256)
ANSWER = "你好。今天天气很好，我们一起说话吧。"
FRAME = 320                                    # 20 ms at 16 kHz
DETECT = TurnDetection(pause_ms=200, commit_ms=700)


def tiny_voice_chat(root: str, asr: bool) -> VoiceChat:
    folders = write_tts_folders(root)
    return VoiceChat.from_pretrained(write_random_step1(f"{root}/chat", seed=7), folders["model"], folders["tokenizer"],
                                     folders["speakers"], device="cpu", asr=asr, chat_engine_args=ENGINE,
                                     tts_engine_args=ENGINE)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    c = tiny_voice_chat(str(tmp_path_factory.mktemp("realtime")), asr=False)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    wav, rate = espeak_wav(str(tmp_path_factory.mktemp("speech") / "q.wav"), "what is the weather like today")
    return resample(torch.from_numpy(wav.astype(np.float32)), rate, 16000).numpy()


def silence(ms: float) -> np.ndarray:
    return np.zeros(int(ms * 16), np.float32)


class Script:
    def __init__(self, tokenizer, text: str):
        newline = len(tokenizer.encode("\n"))
        self.ids = tokenizer.encode("\n" + text)[newline:] + [3]

    def __call__(self, output_ids, logits):
        forced = logits.new_full(logits.shape, float("-inf"))
        forced[self.ids[min(len(output_ids), len(self.ids) - 1)]] = 0.0
        return forced


def session(chat, **kw) -> RealtimeSession:
    script = Script(chat.tokenizer, ANSWER)
    params = SamplingParams(temperature=0.0, max_tokens=len(script.ids) + 4, logits_processors=[script])
    return RealtimeSession(chat, system="简短回答", detection=kw.pop("detection", DETECT),
                           respond_options=dict(chat_params=params, tts_max_tokens=30, tts_seed=1), **kw)


async def feed(s: RealtimeSession, audio: np.ndarray, frame: int = FRAME) -> None:
    for i in range(0, audio.size, frame):
        await s.append((audio[i:i + frame] * 32767).astype(np.int16).tobytes())


async def drain(s: RealtimeSession, until, timeout: float = 120.0) -> list:
    """Events until one satisfies `until` (included)."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        event = await asyncio.wait_for(s.events.get(), max(deadline - time.monotonic(), 0.01))
        out.append(event)
        if until(event):
            return out


def all_pages_free(chat) -> bool:
    bms = (chat.chat_engine.engine.block_manager, chat.tts.engine.engine.block_manager)
    return all(bm.num_free_pages == bm.num_pages for bm in bms)


async def settle(chat) -> None:
    for _ in range(600):
        if all_pages_free(chat):
            return
        await asyncio.sleep(0.05)


def test_a_long_pause_commits_the_speculation_without_recomputing(chat, speech):
    async def run():
        s = session(chat)
        await feed(s, np.concatenate([silence(300), speech, silence(1000)]))
        events = await drain(s, lambda e: isinstance(e, ResponseFinished))
        await s.close()
        await settle(chat)
        return s, events

    s, events = asyncio.run_coroutine_threadsafe(run(), chat.sync_loop()).result()
    kinds = [type(e) for e in events]
    assert kinds[:4] == [SpeechStarted, SpeechStopped, TurnCommitted, ResponseStarted]
    committed = events[2]
    assert committed.responding and events[3].speculative and committed.audio_samples > speech.size * 0.8
    assert 200 <= events[0].audio_ms <= 600 and events[1].audio_ms < committed.audio_ms
    assert committed.audio_ms - events[1].audio_ms == pytest.approx(DETECT.commit_ms, abs=70)
    assert ResponseText in kinds and ResponseAudio in kinds and kinds[-1] is ResponseFinished
    assert "".join(e.text for e in events if isinstance(e, ResponseText)) == ANSWER == events[-1].text
    assert s.stats["speculations"] == 1 and s.stats["promoted"] == 1 and s.stats["discarded"] == 0
    roles = [m.role for m in s.conversation.messages]
    assert roles == ["system", "user", "assistant"] and s.conversation.messages[2].parts == [ANSWER]
    assert all_pages_free(chat)


def test_speech_after_a_short_pause_discards_the_speculation(chat, speech):
    async def run():
        s = session(chat)
        await feed(s, np.concatenate([silence(200), speech, silence(400)]))     # past pause_ms, short of commit
        assert s.state == "paused" and s._answer is not None
        await asyncio.sleep(0.3)                                                # let the speculation get going
        await feed(s, np.concatenate([speech, silence(1000)]))
        events = await drain(s, lambda e: isinstance(e, ResponseFinished))
        await s.close()
        await settle(chat)
        return s, events

    s, events = asyncio.run_coroutine_threadsafe(run(), chat.sync_loop()).result()
    kinds = [type(e) for e in events]
    assert kinds.count(SpeechStarted) == 1 and kinds.count(TurnCommitted) == 1     # one turn, spoken with a pause
    committed = next(e for e in events if isinstance(e, TurnCommitted))
    assert committed.audio_samples > 2 * speech.size * 0.8                          # both parts are in the turn
    assert s.stats["speculations"] == 2 and s.stats["discarded"] == 1 and s.stats["promoted"] == 1
    assert all_pages_free(chat)                                                     # the discarded one's too


def test_barge_in_keeps_only_the_played_sentences(chat, speech):
    async def run():
        s = session(chat)
        await feed(s, np.concatenate([silence(200), speech, silence(1000)]))
        events = await drain(s, lambda e: isinstance(e, ResponseAudio) and e.sentence == 1)
        first_ms = sum(e.audio.duration * 1e3 for e in events if isinstance(e, ResponseAudio) and e.sentence == 0)
        # the first sentence plays through (the session's clock runs on the audio it is given), then the user talks
        await feed(s, silence(first_ms + 100))
        stop = time.monotonic()
        await feed(s, speech[:16000])
        rest = await drain(s, lambda e: isinstance(e, ResponseTruncated) or (isinstance(e, ResponseFinished)
                                                                            and e.interrupted))
        await s.close()
        await settle(chat)
        return s, events, rest, first_ms, time.monotonic() - stop

    s, events, rest, first_ms, _ = asyncio.run_coroutine_threadsafe(run(), chat.sync_loop()).result()
    finished = rest[-1]            # cut while generated, or after (its audio still playing)
    assert finished.text == "你好。"
    assert first_ms <= finished.played_ms
    assert s.conversation.messages[-1].role == "assistant" and s.conversation.messages[-1].parts == ["你好。"]
    # a generation still running is stopped (and timed); an answer still playing is only truncated
    assert len(s.stats["barge_in_stop_s"]) == (1 if isinstance(finished, ResponseFinished) else 0)
    assert all_pages_free(chat)


def test_turn_detection_checks_its_values():
    with pytest.raises(ConfigError, match="pause_ms"):
        TurnDetection(pause_ms=800, commit_ms=700)
    with pytest.raises(ConfigError, match="threshold"):
        TurnDetection(threshold=0)


def test_eight_sessions_at_once_all_complete(chat, speech):
    async def one(k: int):
        s = session(chat)
        await feed(s, np.concatenate([silence(100 + 40 * k), speech, silence(900)]))
        events = await drain(s, lambda e: isinstance(e, ResponseFinished))
        await s.close()
        return s, events

    async def run():
        results = await asyncio.gather(*(one(k) for k in range(8)))
        await settle(chat)
        return results

    results = asyncio.run_coroutine_threadsafe(run(), chat.sync_loop()).result()
    for s, events in results:
        assert [type(e) for e in events][:4] == [SpeechStarted, SpeechStopped, TurnCommitted, ResponseStarted]
        assert events[-1].text == ANSWER and not events[-1].interrupted
        assert [m.role for m in s.conversation.messages] == ["system", "user", "assistant"]
    assert all_pages_free(chat)


def test_input_at_24khz_is_resampled_as_it_arrives(chat, speech):
    speech24 = resample(torch.from_numpy(speech), 16000, 24000).numpy()

    async def run():
        s = session(chat, sample_rate=24000)
        await feed(s, np.concatenate([np.zeros(7200, np.float32), speech24, np.zeros(24000, np.float32)]), frame=480)
        events = await drain(s, lambda e: isinstance(e, ResponseFinished))
        await s.close()
        await settle(chat)
        return s, events

    s, events = asyncio.run_coroutine_threadsafe(run(), chat.sync_loop()).result()
    committed = next(e for e in events if isinstance(e, TurnCommitted))
    assert 200 <= events[0].audio_ms <= 600                        # the clock counts 16 kHz time, as at 16 kHz
    assert speech.size * 0.8 < committed.audio_samples < speech.size * 1.5 + 16000
    assert events[-1].text == ANSWER


def test_without_turn_detection_the_caller_commits_and_asks_for_the_answer(chat, speech):
    async def run():
        s = session(chat, detection=None)
        with pytest.raises(TurnStateError) as empty:
            await s.commit()
        with pytest.raises(TurnStateError) as nothing:
            await s.create_response()
        await feed(s, np.concatenate([speech, silence(1500)]))      # no voice activity detection: no events
        assert s.events.empty()
        await s.commit()
        committed = await s.events.get()
        assert s.events.empty()                                      # no answer until asked for
        await s.create_response()
        with pytest.raises(TurnStateError) as busy:
            await s.create_response()
        events = await drain(s, lambda e: isinstance(e, ResponseFinished))
        await s.close()
        await settle(chat)
        return s, committed, events, (empty.value.code, nothing.value.code, busy.value.code)

    s, committed, events, codes = asyncio.run_coroutine_threadsafe(run(), chat.sync_loop()).result()
    assert codes == ("input_audio_buffer_commit_empty", "no_committed_audio", "conversation_already_has_active_response")
    assert isinstance(committed, TurnCommitted) and not committed.responding
    assert committed.audio_samples == speech.size + 1500 * 16
    assert isinstance(events[0], ResponseStarted) and not events[0].speculative
    assert events[-1].text == ANSWER and s.stats["speculations"] == 0
    assert [m.role for m in s.conversation.messages] == ["system", "user", "assistant"]
    assert all_pages_free(chat)


def test_with_create_response_off_turns_are_committed_but_not_answered(chat, speech):
    async def run():
        s = session(chat, detection=TurnDetection(pause_ms=200, commit_ms=700, create_response=False))
        await feed(s, np.concatenate([silence(200), speech, silence(1000)]))
        first = await drain(s, lambda e: isinstance(e, TurnCommitted))
        await asyncio.sleep(0.3)
        idle = s.events.empty() and s._answer is None                # no speculation either
        await s.create_response()
        events = await drain(s, lambda e: isinstance(e, ResponseFinished))
        await s.close()
        await settle(chat)
        return s, first, idle, events

    s, first, idle, events = asyncio.run_coroutine_threadsafe(run(), chat.sync_loop()).result()
    assert [type(e) for e in first] == [SpeechStarted, SpeechStopped, TurnCommitted] and not first[-1].responding
    assert idle and s.stats["speculations"] == 0
    assert isinstance(events[0], ResponseStarted) and events[-1].text == ANSWER
    assert all_pages_free(chat)


@pytest.fixture(scope="module")
def chat_asr(tmp_path_factory):
    c = tiny_voice_chat(str(tmp_path_factory.mktemp("realtime-asr")), asr=True)
    yield c
    c.shutdown()


def test_transcript_history_reuses_the_users_words_transcribed_once(chat_asr, speech, monkeypatch):
    """history="transcript": the words sent as UserTranscript are the ones that replace the turn's
    audio in the history, from one ASR run per committed turn (none for a discarded speculation)."""
    calls = []
    real = chat_asr.transcriber.transcribe
    monkeypatch.setattr(chat_asr.transcriber, "transcribe", lambda *a, **k: calls.append(1) or real(*a, **k))

    async def run():
        s = session(chat_asr, history="transcript")
        await feed(s, np.concatenate([silence(200), speech, silence(400)]))     # a speculation, then discarded
        await asyncio.sleep(0.2)
        await feed(s, np.concatenate([speech, silence(1000)]))
        events = await drain(s, lambda e: isinstance(e, ResponseFinished))
        while not any(isinstance(e, UserTranscript) for e in events):
            events.append(await asyncio.wait_for(s.events.get(), 60))
        await s.close()
        await settle(chat_asr)
        return s, events

    s, events = asyncio.run_coroutine_threadsafe(run(), chat_asr.sync_loop()).result()
    heard = next(e for e in events if isinstance(e, UserTranscript)).text
    assert len(calls) == 1 and s.stats["discarded"] == 1
    user = s.conversation.messages[1]
    assert user.role == "user" and user.parts == [heard]
    assert s.conversation.compression[0]["transcript"] == heard
