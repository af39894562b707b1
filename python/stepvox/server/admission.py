"""Admission: which requests the server takes on, refused at once (429 with Retry-After) when it
cannot serve them, so that a burst costs the server nothing it cannot serve.

- The queue: at most `max_concurrent` requests run model work at once and `max_queue` more wait for
  a slot, in arrival order; a request beyond both is refused (`queue_full`). Speech, chat and
  transcription requests share the one queue: they share the engines.
- Chunk deadlines: a streamed speech response is played as it arrives, so each of its chunks has a
  deadline (SlackTracker). A new speech request is refused (`deadline_risk`) when `max_streams`
  real-time streams are held already, or when a running stream's recent slack is below
  `min_slack_s`: the engines are not keeping up with the streams they have, and more work would
  make every one of them later. Both are off by default (None).
"""
from __future__ import annotations

import asyncio
import collections
import math

from .errors import ApiError

# how far back a stream's chunk slack counts as recent: about one chunk of a running stream (the
# decoder's windows are 0.5-2 s of audio), so one late chunk refuses arrivals for a moment, not for
# the rest of the stream
RECENT_SLACK_WINDOW_S = 1.0
REFUSAL_REASONS = ("queue_full", "max_streams", "min_slack")


class SlackTracker:
    """One stream's chunk deadlines, as its player sees them. Playback starts when the first chunk
    is sent; each later chunk is due when the audio sent before it has finished playing: the first
    chunk's send time + the seconds of audio sent before it, as long as no chunk was late. Its slack
    is deadline - send time. A chunk sent after its deadline is an underrun: the player ran dry and
    resumes with that chunk, so later deadlines count from its send time (one stall is one underrun,
    not one for every chunk after it). Times are seconds on one clock (time.monotonic)."""

    def __init__(self, window_s: float = RECENT_SLACK_WINDOW_S):
        self.window_s = window_s
        self.deadline: float | None = None     # when the audio sent so far has played; None before the first chunk
        self.chunks = 0
        self.underruns = 0
        self._last_sent: float | None = None
        self._recent: collections.deque[tuple[float, float]] = collections.deque()   # (send time, slack)

    def sent(self, at: float, audio_s: float) -> float | None:
        """A chunk of `audio_s` seconds of audio sent at `at`: its slack (None for the first chunk,
        which has no deadline: its latency is the time to first audio)."""
        if not (math.isfinite(at) and math.isfinite(audio_s)) or audio_s <= 0:
            raise ValueError(f"a chunk needs a finite send time and audio seconds > 0, got at={at!r}, "
                             f"audio_s={audio_s!r}")
        if self._last_sent is not None and at < self._last_sent:
            raise ValueError(f"chunk sent at {at} before the previous one ({self._last_sent}): times go backwards")
        self._last_sent = at
        self.chunks += 1
        if self.deadline is None:
            self.deadline = at + audio_s
            return None
        slack = self.deadline - at
        if slack < 0:
            self.underruns += 1
        self.deadline = max(self.deadline, at) + audio_s
        self._recent.append((at, slack))
        self._forget(at)
        return slack

    def recent_min_slack(self, now: float) -> float | None:
        """The smallest of the slacks of chunks sent in the last `window_s`, and of what the next chunk
        would have if sent now (a stalled stream counts before its late chunk comes); None before the
        first chunk."""
        if self.deadline is None:
            return None
        self._forget(now)
        return min([self.deadline - now, *(slack for _, slack in self._recent)])

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()


class RealtimeStreams:
    """The real-time streams held now (each from its admission to the end of its response) and the
    rule that admits a speech request against them."""

    def __init__(self, max_streams: int | None, min_slack_s: float | None,
                 window_s: float = RECENT_SLACK_WINDOW_S):
        self.max_streams, self.min_slack_s, self.window_s = max_streams, min_slack_s, window_s
        self._held: set[SlackTracker] = set()

    def __len__(self) -> int:
        return len(self._held)

    def recent_min_slack(self, now: float) -> float | None:
        """The smallest recent slack among the held streams (None: none has sent a chunk yet)."""
        slacks = [s for s in (t.recent_min_slack(now) for t in self._held) if s is not None]
        return min(slacks) if slacks else None

    def refusal(self, now: float, realtime: bool) -> tuple[str, str] | None:
        """Why a speech request arriving at `now` must be refused, as (reason, message), or None.
        `realtime`: the request would hold a stream itself (max_streams counts it)."""
        if realtime and self.max_streams is not None and len(self._held) >= self.max_streams:
            return "max_streams", (f"{len(self._held)} real-time speech streams are running (max_streams "
                                   f"{self.max_streams}); another would risk their chunk deadlines")
        if self.min_slack_s is not None:
            slack = self.recent_min_slack(now)
            if slack is not None and slack < self.min_slack_s:
                return "min_slack", (f"a running speech stream's chunk slack is {slack * 1000:.0f} ms, below "
                                     f"min_slack_ms {self.min_slack_s * 1000:.10g}: the server is not keeping up "
                                     "with the streams it has")
        return None

    def open(self) -> SlackTracker:
        tracker = SlackTracker(self.window_s)
        self._held.add(tracker)
        return tracker

    def close(self, tracker: SlackTracker) -> None:
        self._held.discard(tracker)


class Admission:
    """The queue and the chunk-deadline rule of one server, their gauges and refusal counts in
    `metrics` (a ServerMetrics). Event-loop only: no locks."""

    def __init__(self, max_running: int, max_waiting: int, metrics, retry_after_s: int = 1,
                 max_streams: int | None = None, min_slack_s: float | None = None):
        self.max_running, self.max_waiting = max_running, max_waiting
        self.running = self.waiting = 0
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.streams = RealtimeStreams(max_streams, min_slack_s)
        self._slots = asyncio.Semaphore(max_running)      # FIFO: waiters get slots in arrival order
        metrics.watch_streams(self.streams)

    def reserve(self) -> "Ticket":
        """A place in the queue, or ApiError 429 when every slot and queue place is taken."""
        if self.running + self.waiting >= self.max_running + self.max_waiting:
            raise self._refuse("queue_full", "queue_full",
                               f"the server is busy: {self.running} requests running and {self.waiting} waiting "
                               f"(max_concurrent {self.max_running}, max_queue {self.max_waiting}); retry later")
        self.waiting += 1
        self._update()
        return Ticket(self)

    def _refuse(self, reason: str, code: str, message: str) -> ApiError:
        self.metrics.admission_refusals.labels(reason).inc()
        return ApiError(429, message, type="rate_limit_error", code=code,
                        headers={"Retry-After": str(self.retry_after_s)})

    def _update(self) -> None:
        self.metrics.running.set(self.running)
        self.metrics.waiting.set(self.waiting)
        self.metrics.speech_streams.set(len(self.streams))


class Ticket:
    """One request's place: waiting, then running, then released (exactly once, whatever happens),
    and a speech request's real-time stream with it."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._state = "waiting"
        self._stream: StreamHold | None = None

    def hold_stream(self, realtime: bool, now: float) -> "StreamHold | None":
        """Admits a speech request against the running streams' deadlines (ApiError 429 deadline_risk),
        before it waits for a slot. `realtime`: its audio is streamed, so it holds a stream (returned:
        report its chunks to it) until the ticket is released; a whole-file response only passes the
        slack check (None)."""
        a = self._admission
        if self._state != "waiting" or self._stream is not None:
            raise RuntimeError(f"hold_stream on a ticket that is {self._state}, holding a stream: "
                               f"{self._stream is not None}; it is asked once, before the slot")
        refusal = a.streams.refusal(now, realtime)
        if refusal is not None:
            reason, message = refusal
            raise a._refuse(reason, "deadline_risk", message + "; retry later")
        if not realtime:
            return None
        self._stream = StreamHold(a, a.streams.open())
        a._update()
        return self._stream

    async def acquire(self) -> None:
        a = self._admission
        await a._slots.acquire()
        if self._state != "waiting":          # released while waiting for the slot: hand it back
            a._slots.release()
            return
        self._state = "running"
        a.waiting -= 1
        a.running += 1
        a._update()

    def release(self) -> None:
        a = self._admission
        if self._stream is not None:
            a.streams.close(self._stream.tracker)
            self._stream = None
        if self._state == "waiting":
            a.waiting -= 1
        elif self._state == "running":
            a.running -= 1
            a._slots.release()
        else:
            return
        self._state = "released"
        a._update()


class StreamHold:
    """A held real-time stream: each chunk sent is reported here (its slack and underruns go to the
    metrics)."""

    def __init__(self, admission: Admission, tracker: SlackTracker):
        self._metrics = admission.metrics
        self.tracker = tracker

    def sent(self, at: float, audio_s: float) -> None:
        slack = self.tracker.sent(at, audio_s)
        if slack is None:
            return
        self._metrics.chunk_slack.observe(slack)
        if slack < 0:
            self._metrics.underruns.inc()
