"""One speech request, from admission to its last byte.

- Admission: at most `max_concurrent` requests synthesise at once and `max_queue` more wait for a
  slot, in arrival order; a request beyond both is refused at once (429 with Retry-After), so a
  burst costs the server nothing it cannot serve.
- SpeechJob: the TTS stream of one request, encoded as it comes (encoders.py), as raw audio bytes or
  as server-sent events (OpenAI's `speech.audio.delta` with base64 audio, then `speech.audio.done`
  with the token usage); it feeds the metrics.
- SpeechResponse: sends it. The status line waits for the first audio (which leaves at once), so
  every failure before it is a proper JSON error with its status; a failure after it ends the
  stream (an SSE `error` event, or for raw audio a dropped connection: a chunked body without its
  end, which clients report as incomplete). A client that goes away is noticed while the request
  is still generating, not only at the next write: the request is cancelled and its KV pages freed
  at once.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import time
from typing import AsyncIterator

from starlette.responses import Response

from stepvox.engine.pipelines.voices import VoiceRef

from .encoders import StreamEncoder
from .errors import ApiError, from_exception

log = logging.getLogger("stepvox.server")


class Admission:
    def __init__(self, max_running: int, max_waiting: int, metrics, retry_after_s: int = 1):
        self.max_running, self.max_waiting = max_running, max_waiting
        self.running = self.waiting = 0
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self._slots = asyncio.Semaphore(max_running)      # FIFO: waiters get slots in arrival order

    def reserve(self) -> "Ticket":
        """A place in the queue, or ApiError 429 when every slot and queue place is taken."""
        if self.running + self.waiting >= self.max_running + self.max_waiting:
            raise ApiError(429, f"the server is busy: {self.running} requests running and {self.waiting} waiting "
                           f"(max_concurrent {self.max_running}, max_queue {self.max_waiting}); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.retry_after_s)})
        self.waiting += 1
        self._update()
        return Ticket(self)

    def _update(self) -> None:
        self.metrics.running.set(self.running)
        self.metrics.waiting.set(self.waiting)


class Ticket:
    """One request's place: waiting, then running, then released (exactly once, whatever happens)."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._state = "waiting"

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
        if self._state == "waiting":
            a.waiting -= 1
        elif self._state == "running":
            a.running -= 1
            a._slots.release()
        else:
            return
        self._state = "released"
        a._update()


@dataclasses.dataclass
class SpeechPlan:
    """A validated request, as the TTS takes it."""
    text: str
    voice: str
    clone: VoiceRef | None
    tags: dict                    # emotion, language, speed, mode
    speed_factor: float
    volume: float
    seed: int | None
    temperature: float
    top_k: int
    max_tokens: int | None
    response_format: str
    stream_format: str


class SpeechJob:
    def __init__(self, tts, plan: SpeechPlan, encoder: StreamEncoder, request_id: str, metrics, arrival: float):
        self.tts, self.plan, self.encoder = tts, plan, encoder
        self.request_id, self.metrics, self.arrival = request_id, metrics, arrival
        self.audio_seconds = 0.0
        self._tokens: dict[str, tuple[int, int]] = {}      # LM request id -> (prompt tokens, generated tokens)

    def _on_output(self, out) -> None:
        self._tokens[out.request_id] = (len(out.prompt_token_ids), len(out.outputs[0].token_ids))
        self.metrics.lm_output(out)

    def usage(self) -> dict:
        prompt = sum(p for p, _ in self._tokens.values())
        generated = sum(g for _, g in self._tokens.values())
        return {"input_tokens": prompt, "output_tokens": generated, "total_tokens": prompt + generated}

    async def _encode(self, fn, *args) -> bytes:
        # mp3 / opus / resampling take ms per chunk: on a worker thread, not on the event loop
        return await asyncio.to_thread(fn, *args) if self.encoder.threaded else fn(*args)

    async def audio(self) -> AsyncIterator[bytes]:
        """The encoded audio, piece by piece as the TTS produces it."""
        p = self.plan
        started = time.monotonic()
        stream = self.tts.astream(p.text, p.voice, clone=p.clone, emotion=p.tags.get("emotion"),
                                  language=p.tags.get("language"), speed=p.tags.get("speed"),
                                  mode=p.tags.get("mode", "normal"), speed_factor=p.speed_factor, volume=p.volume,
                                  seed=p.seed, temperature=p.temperature, top_k=p.top_k, max_tokens=p.max_tokens,
                                  on_output=self._on_output)
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                self.audio_seconds += chunk.duration
                self.metrics.audio_seconds.inc(chunk.duration)
                data = await self._encode(self.encoder.push, chunk.samples)
                if data:
                    yield data
        data = await self._encode(self.encoder.finish)
        if data:
            yield data
        if self.audio_seconds > 0:
            self.metrics.rtf.observe((time.monotonic() - started) / self.audio_seconds)

    async def events(self) -> AsyncIterator[bytes]:
        """The same audio as server-sent events, then the done event with the usage."""
        # aclosing: when this generator is closed (a disconnect), the audio generator and its LM request
        # close at once, not when the garbage collector gets to them
        async with contextlib.aclosing(self.audio()) as audio:
            async for data in audio:
                yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
        yield sse_event({"type": "speech.audio.done", "usage": self.usage(),
                         "stepvox": {"request_id": self.request_id, "audio_seconds": round(self.audio_seconds, 6),
                                     "sample_rate": self.encoder.sample_rate,
                                     "tags": {k: v for k, v in self.plan.tags.items() if v}}})

    def pieces(self) -> AsyncIterator[bytes]:
        return self.events() if self.plan.stream_format == "sse" else self.audio()


def sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _ClientGone(Exception):
    pass


class StreamFailed(Exception):
    """Raised out of the app after the status line: uvicorn drops the connection, so the client sees
    a body without its end. Already logged and counted."""
    already_reported = True


class SpeechResponse(Response):
    """Streams a SpeechJob (see the module docstring); `headers` go out with the audio. Holds the
    request's admission ticket and releases it when the response ends, however it ends."""

    def __init__(self, job: SpeechJob, ticket: Ticket, headers: dict[str, str], metrics):
        self.job, self.ticket, self.metrics = job, ticket, metrics
        self.status_code = 200
        self.media_type = "text/event-stream" if job.plan.stream_format == "sse" else job.encoder.media_type
        self.background = None
        self.init_headers(headers)            # content-type from media_type; no body, so no content-length
        self.outcome = "error"
        self._ending = False                  # the last byte is being sent: a disconnect now is no cancel

    async def __call__(self, scope, receive, send) -> None:
        producer = asyncio.create_task(self._produce(send))
        listener = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
            if not producer.done() and not self._ending:
                self.outcome = "cancelled"
                log.info("request %s: the client went away; cancelled", self.job.request_id)
        except asyncio.CancelledError:
            # cancelled from outside (a shutdown's deadline) while the request ran: not an error
            if not producer.done():
                self.outcome = "cancelled"
            raise
        finally:
            # on a disconnect, and on a cancellation from outside (a shutdown's deadline): stop the
            # request now, which aborts its LM request (its KV pages return at once)
            producer.cancel()
            listener.cancel()
            try:
                results = await asyncio.gather(producer, listener, return_exceptions=True)
            except asyncio.CancelledError:
                # cancelled again while waiting for the producer to stop: release and count anyway
                if self.outcome != "ok":
                    self.outcome = "cancelled"
                raise
            finally:
                self.ticket.release()
                p = self.job.plan
                self.metrics.speech_requests.labels(p.response_format, p.stream_format, self.outcome).inc()
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, _ClientGone):
            raise error               # raw audio failed after its status line: drop the connection

    async def _produce(self, send) -> None:
        job = self.job
        pieces = job.pieces()
        started = False

        async def emit(message):
            try:
                await send(message)
            except OSError as exc:    # uvicorn's ClientDisconnected: the listener reports it too
                raise _ClientGone() from exc

        try:
            await self.ticket.acquire()
            try:
                first = await anext(pieces, None)
            except Exception as exc:  # noqa: BLE001 - every failure before the audio is a JSON error
                error = from_exception(exc, job.request_id, audio_param="ref_audio")
                self.metrics.errors.labels(error.type, error.code or "-").inc()
                response = error.response()
                await response({"type": "http"}, _no_receive, emit)
                return
            raw = list(self.raw_headers)
            if job.plan.stream_format == "audio" and not job.encoder.progressive and first is not None:
                raw.append((b"content-length", str(len(first)).encode()))    # the whole file in one piece
            await emit({"type": "http.response.start", "status": 200, "headers": raw})
            started = True
            if first is not None:
                await emit({"type": "http.response.body", "body": first, "more_body": True})
                # time to first audio: when its first bytes leave (a whole-file format's at its end)
                self.metrics.first_audio.observe(time.monotonic() - job.arrival)
            async for piece in pieces:
                await emit({"type": "http.response.body", "body": piece, "more_body": True})
            self._ending = True
            await emit({"type": "http.response.body", "body": b"", "more_body": False})
            self.outcome = "ok"
        except _ClientGone:
            self.outcome = "cancelled"
            raise
        except Exception as exc:      # noqa: BLE001 - after the status line: end the stream
            if not started:
                raise
            error = from_exception(exc, job.request_id, audio_param="ref_audio")     # logged there
            self.metrics.errors.labels(error.type, error.code or "-").inc()
            if job.plan.stream_format != "sse":
                raise StreamFailed(error.message) from exc
            event = sse_event({"type": "error", "error": error.body()["error"]})
            await emit({"type": "http.response.body", "body": event, "more_body": False})
        finally:
            await pieces.aclose()


async def _wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _no_receive():
    return {"type": "http.disconnect"}
