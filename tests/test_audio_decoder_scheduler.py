"""Cross-stream decoder scheduling (engine/audio/decoder_scheduler.py) and its use by TTS.astream:
streams pushed interleaved and decoded in shared rounds get the windows and audio they get alone
(bit for bit where the model cannot differ by batch; float rounding with the random tiny model),
earliest deadline first, closed streams leave at once, and concurrent TTS requests sound as
sequential ones."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque

import numpy as np
import pytest
import torch

from stepvox.testing.cosyvoice import random_speaker_prompt, random_speech_tokens
from stepvox.engine.audio.decoder_scheduler import DecoderScheduler, Playback
from stepvox.engine.errors import ConfigError, SpeechTokenError, StreamClosedError


class ManualExecutor(concurrent.futures.Executor):
    """Runs the scheduler's rounds only when the test says so, in the test's thread."""

    def __init__(self):
        self.queue: deque = deque()

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        self.queue.append((future, fn, args, kwargs))
        return future

    def run(self) -> int:
        rounds = 0
        while self.queue:
            future, fn, args, kwargs = self.queue.popleft()
            future.set_result(fn(*args, **kwargs))
            rounds += 1
        return rounds


_prompt, _tokens = random_speaker_prompt, random_speech_tokens


def _submissions(n, seed, group=5, empty_finish=False):
    """A request's submissions: 5-token groups, the last one finishing (or an empty finishing one)."""
    toks = _tokens(n, seed)
    subs = [(toks[i:i + group], False) for i in range(0, n, group)]
    if empty_finish:
        return subs + [([], True)]
    return subs[:-1] + [(subs[-1][0], True)]


def _alone(decoder, prompt, seed, submissions):
    """What each submission gives when its stream is the only one: push, finish, step."""
    st = decoder.open_stream(prompt, seed=seed)
    out = []
    for toks, finished in submissions:
        decoder.push(st, toks)
        if finished:
            st.finish()
        out.append([c.float().numpy() for c in decoder.step_streams([st])[0]])
    return out


def _spy_rounds(decoder, monkeypatch):
    """Record the streams of every decode_windows call."""
    rounds = []
    real = decoder.decode_windows

    def spy(streams):
        rounds.append(list(streams))
        return real(streams)
    monkeypatch.setattr(decoder, "decode_windows", spy)
    return rounds


# four requests: different prompt speakers (one none), seeds and lengths; one ends with an empty
# finishing submission right where a window is ready (its last window is then a separate final one)
REQUESTS = [(_prompt(10), 5, _submissions(95, 20)),
            (_prompt(11, n_tokens=9, frames=21), 6, _submissions(65, 21, empty_finish=True)),
            (None, 7, _submissions(40, 22)),
            (_prompt(12, n_tokens=15, frames=40), 8, _submissions(130, 23))]


def _scheduled(decoder, max_batch, executor=None):
    """REQUESTS pushed interleaved (one submission per request, then the waiting rounds run)."""
    executor = executor or ManualExecutor()
    scheduler = DecoderScheduler(decoder, executor, max_batch=max_batch)
    streams = [scheduler.open(p, seed=s) for p, s, _ in REQUESTS]
    futures = [[] for _ in REQUESTS]
    for step in range(max(len(subs) for _, _, subs in REQUESTS)):
        for k, (_, _, subs) in enumerate(REQUESTS):
            if step < len(subs):
                futures[k].append(streams[k].submit(*subs[step]))
        executor.run()
    assert scheduler.active == 4 and all(f.done() for fs in futures for f in fs)
    for st in streams:
        st.close()
    assert scheduler.active == 0
    return [[f.result() for f in fs] for fs in futures], scheduler


@pytest.fixture
def row_local_decoder(tiny_decoder, monkeypatch):
    """The tiny decoder with flow and HiFT replaced by per-item elementwise stand-ins (the flow's mel
    is its ODE start noise, HiFT's wave a scaled mel channel plus source noise): batching cannot
    change one of their numbers, so anything that differs comes from the scheduling."""
    spf = tiny_decoder.samples_per_token_frame

    def generate(reqs, solver, prep=None):
        mels = [r.noise[:, r.prompt_frames:r.total_frames].float() * 0.5 - 3 for r in reqs]
        mus = [torch.arange(r.total_frames, dtype=torch.float32).expand(80, -1).clone() for r in reqs]
        return mels, mus

    def hift(mel, start_phase, noise, phase_offset=None, phase_anchor=None, cache_source=None, frames=None):
        wav = 0.1 * mel[:, 0].repeat_interleave(spf, dim=-1) + 0.01 * noise[:, 0]
        return wav, None, torch.zeros(mel.shape[0], noise.shape[1], wav.shape[-1], dtype=torch.float64)

    monkeypatch.setattr(tiny_decoder.flow, "generate", generate)
    monkeypatch.setattr(tiny_decoder.hift, "forward", hift)
    return tiny_decoder


def _assert_same(got, want, exact):
    for g_sub, w_sub in zip(got, want, strict=True):
        assert [c.size for c in g_sub] == [c.size for c in w_sub]          # the same windows, chunk by chunk
        for g, w in zip(g_sub, w_sub):
            if exact:
                np.testing.assert_array_equal(g, w)
            else:
                np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4)


def test_scheduled_streams_cut_the_same_windows_bit_for_bit(row_local_decoder, monkeypatch):
    rounds = _spy_rounds(row_local_decoder, monkeypatch)
    got, scheduler = _scheduled(row_local_decoder, max_batch=3)
    assert max(len(r) for r in rounds) == 3 and scheduler.rounds == len(rounds)   # windows shared rounds
    assert scheduler.windows == sum(len(r) for r in rounds)
    for (prompt, seed, subs), mine in zip(REQUESTS, got):
        _assert_same(mine, _alone(row_local_decoder, prompt, seed, subs), exact=True)
    # the empty finishing submission decodes a final window of its own, as it does alone
    assert len(got[1][-1]) == 1 and len(got[1][-2]) == 1


def test_batched_decoder_windows_equal_unbatched_ones_per_stream(tiny_decoder, monkeypatch):
    rounds = _spy_rounds(tiny_decoder, monkeypatch)
    got, _ = _scheduled(tiny_decoder, max_batch=4)
    assert max(len(r) for r in rounds) >= 3
    for (prompt, seed, subs), mine in zip(REQUESTS, got):
        # float32 rounding only: other batch sizes and padded lengths pick other kernel algorithms
        _assert_same(mine, _alone(tiny_decoder, prompt, seed, subs), exact=False)


def test_earliest_deadline_is_served_first(tiny_decoder, monkeypatch):
    rounds = _spy_rounds(tiny_decoder, monkeypatch)
    executor, now = ManualExecutor(), [10.0]
    scheduler = DecoderScheduler(tiny_decoder, executor, max_batch=1, first_audio_target=0.3, clock=lambda: now[0])
    sr = tiny_decoder.sample_rate
    playing_long, playing_short = Playback(sr, arrival=0.0), Playback(sr, arrival=0.0)
    playing_long.delivered(2 * sr, now=9.0)           # due at 11.0
    playing_short.delivered(sr // 2, now=9.0)         # due at 9.5
    waiting = Playback(sr, arrival=9.9)                # no audio yet: due at arrival + 0.3 = 10.2
    new = Playback(sr, arrival=9.0)                    # due at 9.3: the most urgent
    deadlines = [p.deadline(0.3) for p in (playing_long, playing_short, waiting, new)]
    assert deadlines == pytest.approx([11.0, 9.5, 10.2, 9.3])
    names = {}
    futures = []
    for name, playback in (("long", playing_long), ("short", playing_short), ("waiting", waiting), ("new", new)):
        st = scheduler.open(None, seed=1, playback=playback)
        names[id(st.stream)] = name
        futures.append(st.submit(_tokens(35), finished=False))       # one first window each
    assert executor.run() == 4 and all(len(r) == 1 for r in rounds)
    assert [names[id(r[0])] for r in rounds] == ["new", "short", "waiting", "long"]
    assert all(len(f.result()) == 1 for f in futures)
    assert new.first_audio == 10.0 and new.delivered_seconds > 0            # its audio is on the clock now


def test_speed_shortens_the_delivered_playtime():
    a, b = Playback(22050, arrival=0.0), Playback(22050, speed=2.0, arrival=0.0)
    a.delivered(22050, now=1.0)
    b.delivered(22050, now=1.0)
    assert a.deadline(0.0) == 2.0 and b.deadline(0.0) == 1.5


def test_a_closed_stream_is_dropped_at_once_and_the_others_continue(tiny_decoder, monkeypatch):
    rounds = _spy_rounds(tiny_decoder, monkeypatch)
    executor = ManualExecutor()
    scheduler = DecoderScheduler(tiny_decoder, executor, max_batch=4)
    subs = _submissions(100, 30)
    keep, gone, cancelled = (scheduler.open(_prompt(k), seed=k) for k in range(3))
    results = []
    for step, sub in enumerate(subs):
        results.append(keep.submit(*sub))
        if step <= 6:
            pending_gone, pending_cancelled = gone.submit(*sub), cancelled.submit(*sub)
        if step == 6:                       # 35 tokens: every stream has its first window waiting
            assert not rounds and scheduler.active == 3
            gone.close()
            assert pending_gone.cancelled() and scheduler.active == 2
            pending_cancelled.cancel()      # a request that stops waiting: its stream leaves too
            assert scheduler.active == 1 and cancelled.closed
            with pytest.raises(StreamClosedError):
                gone.submit([1, 2, 3])
        executor.run()
    assert rounds and all(r == [keep.stream] for r in rounds)    # the others never reached a launch
    _assert_same([f.result() for f in results], _alone(tiny_decoder, _prompt(0), 0, subs), exact=False)


def test_a_stream_closed_while_its_window_decodes_gets_nothing_more(tiny_decoder, monkeypatch):
    executor = ManualExecutor()
    scheduler = DecoderScheduler(tiny_decoder, executor, max_batch=4)
    a, b = scheduler.open(None, seed=1), scheduler.open(None, seed=2)
    real = tiny_decoder.decode_windows

    def close_a_meanwhile(streams):
        out = real(streams)
        a.close()
        return out
    monkeypatch.setattr(tiny_decoder, "decode_windows", close_a_meanwhile)
    fa, fb = a.submit(_tokens(35)), b.submit(_tokens(35))
    executor.run()
    assert fa.cancelled() and len(fb.result()) == 1 and scheduler.active == 1


def test_misuse_and_shutdown_are_typed_errors(tiny_decoder):
    executor = ManualExecutor()
    with pytest.raises(ConfigError, match="max_batch"):
        DecoderScheduler(tiny_decoder, executor, max_batch=0)
    with pytest.raises(ConfigError, match="first_audio_target"):
        DecoderScheduler(tiny_decoder, executor, first_audio_target=-1.0)
    scheduler = DecoderScheduler(tiny_decoder, executor)
    st = scheduler.open(None, seed=0)
    with pytest.raises(SpeechTokenError):
        st.submit([99999])
    with pytest.raises(SpeechTokenError, match="without any tokens"):
        st.submit([], finished=True)
    assert st.submit([1, 2, 3]).result() == []                  # no window yet: resolved at once
    pending = st.submit(_tokens(40))
    assert not pending.done() and len(executor.queue) == 1 and scheduler.waiting == 1
    scheduler.close()
    with pytest.raises(StreamClosedError):
        pending.result()
    with pytest.raises(StreamClosedError):
        scheduler.open(None)
    done = concurrent.futures.ThreadPoolExecutor(1)
    done.shutdown()
    other = DecoderScheduler(tiny_decoder, done).open(None, seed=0)
    with pytest.raises(StreamClosedError, match="executor"):
        other.submit(_tokens(35)).result()
    fin = DecoderScheduler(tiny_decoder, ManualExecutor()).open(None, seed=0)
    fin.submit([1, 2], finished=True)
    with pytest.raises(StreamClosedError, match="finishing"):
        fin.submit([3])


def test_rounds_on_a_real_thread_serve_concurrent_waiters(tiny_decoder, monkeypatch):
    """Many submitters on threads, one decoder thread: every future resolves with its audio."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decoder") as decoder_thread:
        scheduler = DecoderScheduler(tiny_decoder, decoder_thread, max_batch=3)
        threads_seen = set()
        real = tiny_decoder.decode_windows

        def on_which_thread(streams):
            threads_seen.add(threading.current_thread().name)
            return real(streams)
        monkeypatch.setattr(tiny_decoder, "decode_windows", on_which_thread)

        def request(k):
            st = scheduler.open(_prompt(k), seed=k)
            out = [st.submit(t, f).result(timeout=60) for t, f in _submissions(45 + 5 * k, k)]
            st.close()
            return out
        with concurrent.futures.ThreadPoolExecutor(4) as callers:
            got = list(callers.map(request, range(4)))
        monkeypatch.undo()
    assert len(threads_seen) == 1 and next(iter(threads_seen)).startswith("decoder")
    for k, mine in enumerate(got):
        _assert_same(mine, _alone(tiny_decoder, _prompt(k), k, _submissions(45 + 5 * k, k)), exact=False)


# ---------------------------------------------------------------- TTS.astream
@pytest.fixture(scope="module")
def tts(tmp_path_factory):
    from stepvox.engine.pipelines.tts import TTS
    from stepvox.testing.tts import write_tts_folders
    folders = write_tts_folders(str(tmp_path_factory.mktemp("tts")))
    t = TTS.from_pretrained(folders["model"], folders["tokenizer"], folders["speakers"], device="cpu",
                            kernel_backend="reference", max_model_len=2048, num_kv_pages=256,
                            voices_dir=str(tmp_path_factory.mktemp("voices")))
    yield t
    t.shutdown()


TTS_REQUESTS = [dict(text="你好。", voice="Tingting", seed=3, max_tokens=45),
                dict(text="今天天气很好。", voice="Tingting", seed=4, max_tokens=70),
                dict(text="hello there", voice="Tingting", temperature=0.0, seed=6, max_tokens=90),
                dict(text="再见。", voice="Tingting", mode="rap", seed=5, max_tokens=60)]


async def _collect(tts, request):
    tokens, chunks = [], []
    kw = dict(request)
    text, voice = kw.pop("text"), kw.pop("voice")
    async for audio in tts.astream(text, voice, ignore_eos=True,
                                   on_output=lambda out: tokens.extend(out.outputs[0].new_token_ids), **kw):
        chunks.append(audio.samples)
    return tokens, chunks


def test_concurrent_tts_requests_sound_as_sequential_ones(tts, monkeypatch):
    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, tts._loop).result(timeout=300)

    sequential = [run(_collect(tts, r)) for r in TTS_REQUESTS]
    speech, sizes = tts._speech_scheduler, []
    real = speech.decoder.decode_windows

    def first_round_waits_for_others(streams):
        sizes.append(len(streams))
        if len(sizes) == 1:                     # let other requests' windows pile up behind it
            until = time.monotonic() + 60
            while speech.waiting < 2 and time.monotonic() < until:
                time.sleep(0.01)
        return real(streams)
    monkeypatch.setattr(speech.decoder, "decode_windows", first_round_waits_for_others)

    async def together():
        return await asyncio.gather(*(_collect(tts, r) for r in TTS_REQUESTS))
    concurrent_ = run(together())
    assert max(sizes) >= 2                                     # windows of several requests shared a launch
    for (tok_a, a), (tok_b, b) in zip(sequential, concurrent_):
        assert tok_a == tok_b                                  # the LM gave the same speech tokens
        assert [c.size for c in a] == [c.size for c in b] and len(a) > 1
        np.testing.assert_allclose(np.concatenate(b), np.concatenate(a), atol=1e-4, rtol=1e-3)
    assert tts._speech_scheduler.active == 0 and tts._music_scheduler.active == 0


def test_a_stopped_tts_request_leaves_the_decoder_schedule(tts):
    stream = tts.stream("一二三四五六七八九十。", "Tingting", max_tokens=400, seed=1)
    next(stream)
    assert tts._speech_scheduler.active == 1
    stream.close()
    assert tts._speech_scheduler.active == 0
