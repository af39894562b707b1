"""Cross-stream speech decoding: the decoder streams of concurrent requests share decoder launches,
served earliest deadline first.

    scheduler = DecoderScheduler(decoder, executor, max_batch=16)    # executor: the decoder thread
    stream = scheduler.open(prompt, seed=0, playback=Playback(decoder.sample_rate))
    chunks = await asyncio.wrap_future(stream.submit(tokens, finished=False))   # float32 numpy chunks
    stream.close()                                                              # leaves at once

Requests submit their new tokens from any thread; a submission's future resolves with the audio
those tokens make. One worker, run a round at a time on `executor` (one thread, so every decoder
launch stays on it; rounds of other schedulers on that executor interleave), gathers every stream
with a ready window, orders them by deadline, takes up to `max_batch` and decodes one window of
each in one `SpeechDecoder.decode_windows` call (one padded flow batch, one HiFT batch).

Deadlines: a request's audio plays from its first chunk on, so its next deadline is when the audio
delivered so far finishes playing (`Playback`, shared by the streams of one request: the segments
of a long text). A request that has delivered nothing is due at arrival + `first_audio_target`
(0 by default: the most urgent). Ties go to the stream opened first.

What a stream gets: per submission, the chunks that pushing its tokens and stepping that stream
alone gives, cut from the same windows (a submission is applied only once the stream has decoded
every window of the earlier ones, so the last window is final exactly when it would be alone).
The numbers of a window batched with others equal those of the window decoded alone up to float
rounding (fp32 CPU: ~1e-5), not bit for bit: kernels choose other algorithms for other batch sizes
(GEMM at a few rows, oneDNN convolutions) and padded lengths (masked statistics, key masks).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import checks
from ..errors import ConfigError, InvalidRequestError, SpeechTokenError, StreamClosedError
from .decoder import SpeakerPrompt, SpeechDecoder
from .decoder_stream import DecoderStream, StreamConfig


class Playback:
    """The play-out clock of one request: when it arrived, when its first audio was delivered and
    how many seconds of audio it has been handed since (`speed` > 1: the audio is played faster)."""

    def __init__(self, sample_rate: int, speed: float = 1.0, arrival: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        speed = checks.real(speed, "speed", InvalidRequestError, 0.0, lo_open=True)
        self.seconds_per_sample = 1.0 / (sample_rate * speed)
        self.arrival = clock() if arrival is None else float(arrival)
        self.first_audio: float | None = None
        self.delivered_seconds = 0.0

    def deadline(self, first_audio_target: float) -> float:
        """When the next audio must be delivered: the end of what was delivered, or for a request
        without audio yet, arrival + first_audio_target."""
        if self.first_audio is None:
            return self.arrival + first_audio_target
        return self.first_audio + self.delivered_seconds

    def delivered(self, samples: int, now: float) -> None:
        if samples <= 0:
            return
        if self.first_audio is None:
            self.first_audio = now
        self.delivered_seconds += samples * self.seconds_per_sample


@dataclass
class _Submission:
    tokens: list[int]
    finished: bool
    future: concurrent.futures.Future


# (future, result or exception) pairs, settled once the scheduler's lock is released
_Settlements = list[tuple[concurrent.futures.Future, object]]


class ScheduledStream:
    """A request's handle on one decoder stream in a DecoderScheduler. While it is open, only the
    scheduler touches `stream` (on its worker, or under its lock)."""

    def __init__(self, scheduler: "DecoderScheduler", stream: DecoderStream, playback: Playback, order: int):
        self.stream = stream
        self.playback = playback
        self._scheduler = scheduler
        self._order = order                    # opening order: breaks deadline ties
        self._inbox: deque[_Submission] = deque()
        self._serving: _Submission | None = None   # applied; the stream has a ready window for it
        self._chunks: list[np.ndarray] = []        # audio of the submission being served
        self._in_flight = False                    # its window is being decoded now
        self._submitted_tokens = 0
        self._finish_submitted = False
        self.closed = False

    def submit(self, tokens, finished: bool = False) -> concurrent.futures.Future:
        """Queue `tokens` (flow ids; none is fine), with `finished` on the last submission. The
        future resolves with the float32 numpy chunks these tokens make (often none); cancelling
        it closes the stream."""
        return self._scheduler._submit(self, tokens, finished)

    def close(self) -> None:
        """Leave the scheduler now: no later window is decoded; pending submissions are cancelled."""
        self._scheduler._drop(self)

    @property
    def ready(self) -> bool:
        """A submission waits for this stream's next window (and no round is decoding it now)."""
        return self._serving is not None and not self._in_flight

    def deadline(self, first_audio_target: float) -> float:
        return self.playback.deadline(first_audio_target)


class DecoderScheduler:
    def __init__(self, decoder: SpeechDecoder, executor: concurrent.futures.Executor, max_batch: int = 16,
                 first_audio_target: float = 0.0, clock: Callable[[], float] = time.monotonic):
        """decoder: the SpeechDecoder every stream of this scheduler uses; executor: where rounds run
        (one thread: the decoder's launches stay on it); max_batch: the most windows of one round;
        first_audio_target: seconds after arrival by which a request's first audio is due (its
        deadline until it has audio); clock: seconds, monotonic (tests pass a fake one)."""
        self.decoder = decoder
        self.max_batch = checks.integer(max_batch, "max_batch", ConfigError, 1)
        self.first_audio_target = checks.real(first_audio_target, "first_audio_target", ConfigError, 0.0)
        self._executor = executor
        self._clock = clock
        self._lock = threading.RLock()
        self._streams: dict[int, ScheduledStream] = {}     # by opening order
        self._opened = 0
        self._round_queued = False
        self._closed = False
        self.rounds = 0                                    # decode rounds run (one decode_windows each)
        self.windows = 0                                   # windows decoded over all rounds

    # ------------------------------------------------------------------ requests' side
    def playback(self, speed: float = 1.0) -> Playback:
        """A new request's play-out clock (arrival: now, on this scheduler's clock)."""
        return Playback(self.decoder.sample_rate, speed, clock=self._clock)

    def open(self, prompt: SpeakerPrompt | None = None, seed: int | None = None, config: StreamConfig | None = None,
             playback: Playback | None = None) -> ScheduledStream:
        """A new decoder stream in the schedule. playback: the request's clock, shared by all its
        streams (default: a new one, arriving now)."""
        stream = self.decoder.open_stream(prompt, seed, config)
        with self._lock:
            if self._closed:
                raise StreamClosedError("the decoder scheduler is closed")
            handle = ScheduledStream(self, stream, playback or self.playback(), self._opened)
            self._streams[self._opened] = handle
            self._opened += 1
        return handle

    @property
    def active(self) -> int:
        """Open streams."""
        with self._lock:
            return len(self._streams)

    @property
    def waiting(self) -> int:
        """Streams with a window waiting for a round (the queue depth)."""
        with self._lock:
            return sum(h.ready for h in self._streams.values())

    def close(self) -> None:
        """Refuse new streams and fail every pending submission (StreamClosedError)."""
        with self._lock:
            self._closed = True
            settle = self._fail_all(StreamClosedError("the decoder scheduler was closed"))
        _settle(settle)

    def _submit(self, handle: ScheduledStream, tokens, finished: bool) -> concurrent.futures.Future:
        tokens = self.decoder.checked_tokens(tokens)
        future: concurrent.futures.Future = concurrent.futures.Future()
        # a request that stops waiting has no use for the stream's later audio
        future.add_done_callback(lambda f: f.cancelled() and handle.close())
        with self._lock:
            if handle.closed or self._closed:
                raise StreamClosedError("tokens submitted to a closed decoder stream")
            if handle._finish_submitted:
                raise StreamClosedError("tokens submitted after the stream's finishing submission")
            if finished and handle._submitted_tokens + len(tokens) == 0:
                raise SpeechTokenError("a stream was finished without any tokens")
            handle._submitted_tokens += len(tokens)
            handle._finish_submitted = bool(finished)
            handle._inbox.append(_Submission(tokens, bool(finished), future))
            settle = [] if handle._in_flight else self._admit(handle)
            settle += self._queue_round()
        _settle(settle)
        return future

    def _drop(self, handle: ScheduledStream) -> None:
        with self._lock:
            if handle.closed:
                return
            pending = self._detach(handle)
        for sub in pending:
            sub.future.cancel()

    # ------------------------------------------------------------------ under the lock
    def _admit(self, handle: ScheduledStream) -> _Settlements:
        """Apply queued submissions while the stream has no window to decode; a submission that
        makes one ready is served by the rounds, one that does not resolves at once (no audio)."""
        settle = []
        stream = handle.stream
        while handle._serving is None and handle._inbox:
            sub = handle._inbox.popleft()
            stream.push(sub.tokens)
            if sub.finished:
                stream.finish()
            if stream.pending_window() is None:
                settle.append((sub.future, []))
            else:
                handle._serving, handle._chunks = sub, []
        return settle

    def _queue_round(self) -> _Settlements:
        """Put one round on the executor if work waits and none is queued."""
        if self._round_queued or self._closed or not any(h.ready for h in self._streams.values()):
            return []
        try:
            self._executor.submit(self._round)
        except RuntimeError as exc:          # the executor was shut down
            self._closed = True
            return self._fail_all(StreamClosedError(f"the decoder scheduler's executor is gone: {exc}"))
        self._round_queued = True
        return []

    def _fail_all(self, error: Exception) -> _Settlements:
        settle = []
        for handle in list(self._streams.values()):
            settle += self._fail(handle, error)
        return settle

    def _fail(self, handle: ScheduledStream, error: Exception) -> _Settlements:
        return [(sub.future, error) for sub in self._detach(handle)]

    def _detach(self, handle: ScheduledStream) -> list[_Submission]:
        """Take the stream out of the schedule; returns its unanswered submissions."""
        handle.closed = True
        self._streams.pop(handle._order, None)
        pending = ([handle._serving] if handle._serving is not None else []) + list(handle._inbox)
        handle._serving, handle._chunks = None, []
        handle._inbox.clear()
        return pending

    def _pick(self) -> list[ScheduledStream]:
        """Earliest deadline first, up to max_batch streams with a ready window."""
        ready = [h for h in self._streams.values() if h.ready]
        ready.sort(key=lambda h: (h.deadline(self.first_audio_target), h._order))
        return ready[:self.max_batch]

    # ------------------------------------------------------------------ the worker
    def _round(self) -> None:
        """One round on the executor: pick, decode one window of each picked stream, hand the audio
        of finished submissions back, queue the next round."""
        with self._lock:
            self._round_queued = False
            batch = self._pick()
            for h in batch:
                h._in_flight = True
        if not batch:
            return
        error, chunks = None, None
        try:
            with torch.inference_mode():
                chunks = _to_host(self.decoder.decode_windows([h.stream for h in batch]))
        except Exception as exc:  # noqa: BLE001 - the failure belongs to the requests of this batch
            error = exc
        settle = []
        with self._lock:
            now = self._clock()
            self.rounds += 1
            self.windows += len(batch)
            for k, handle in enumerate(batch):
                handle._in_flight = False
                if handle.closed:
                    continue
                if error is not None:          # its stream's state is unknown now: it cannot go on
                    settle += self._fail(handle, error)
                    continue
                handle._chunks.extend(chunks[k])
                if handle.stream.pending_window() is None:
                    audio, handle._chunks = handle._chunks, []
                    handle.playback.delivered(sum(c.size for c in audio), now)
                    settle.append((handle._serving.future, audio))
                    handle._serving = None
                    settle += self._admit(handle)
            settle += self._queue_round()
        _settle(settle)


def _to_host(chunks: list[list[torch.Tensor]]) -> list[list[np.ndarray]]:
    """Device chunks -> float32 numpy, with one copy to the host for the whole round (then one array
    per chunk, so that no request holds a view of another's audio)."""
    flat = [c.float().reshape(-1) for per_stream in chunks for c in per_stream]
    if not flat:
        return [[] for _ in chunks]
    joined = torch.cat(flat).cpu().numpy()
    out, at = [], 0
    for per_stream in chunks:
        mine = []
        for c in per_stream:
            mine.append(joined[at:at + c.numel()].copy())
            at += c.numel()
        out.append(mine)
    return out


def _settle(settlements: _Settlements) -> None:
    """Resolve futures outside the lock (their callbacks may call back into the scheduler)."""
    for future, outcome in settlements:
        if future.done():                    # cancelled by its request meanwhile
            continue
        try:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        except concurrent.futures.InvalidStateError:
            pass
