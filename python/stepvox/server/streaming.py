"""One model response sent as it is made, for every route whose answer comes from the engines
(speech, chat completions): a StreamJob makes the body piece by piece, a StreamedResponse sends it.

- The status line waits for the first piece (which leaves at once), so every failure before it is
  a proper JSON error with its status. A failure after it ends the stream: with an error event for
  server-sent events (the job writes it in its API's shape), otherwise by dropping the connection
  (a chunked body without its end, which clients report as incomplete).
- A client that goes away is noticed while the job is still generating, not only at the next
  write: the job's generator is closed at once, which aborts its engine requests and frees their
  KV pages.
- The response holds the request's admission ticket: the job starts once it has a slot, and the
  ticket is released however the response ends. A speech job is first admitted against the running
  streams' chunk deadlines (admission.py; refused with 429 before it waits for a slot); a streamed
  one then reports each piece's send time and audio seconds, which give its chunks' slack. The job
  counts its outcome once: ok, error, refused, or cancelled (the client left, or the server's
  shutdown deadline passed).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

from starlette.responses import Response

from .admission import StreamHold, Ticket
from .errors import ApiError, from_exception

log = logging.getLogger("stepvox.server")


class StreamJob:
    """The body of one streamed response; subclasses set the attributes and make `pieces`."""
    request_id: str
    media_type: str
    sse = False           # server-sent events: a failure after the status line is sent as an event
    whole = False         # the first piece is the whole body: it goes out with its Content-Length
    deadline_admitted = False   # speech: admitted against the running streams' chunk deadlines; unless
                                # `whole`, a real-time stream whose chunks' slack is tracked

    def pieces(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    def error(self, exc: BaseException) -> ApiError:
        """The error response (or event) for `exc`, raised while the job ran."""
        return from_exception(exc, self.request_id)

    def error_event(self, error: ApiError) -> bytes:
        """The last bytes of an event stream that failed after its status line."""
        raise NotImplementedError

    def first_sent(self) -> None:
        """The first piece has left (time-to-first metrics)."""

    def pop_audio_seconds(self) -> float:
        """Seconds of audio in the pieces handed out since the last call (0: none, or no audio)."""
        return 0.0

    def finished(self, outcome: str) -> None:
        """Called once when the response ends: ok, error, refused (deadline_risk) or cancelled."""


def sse_event(payload) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _ClientGone(Exception):
    pass


class StreamFailed(Exception):
    """Raised out of the app after the status line: uvicorn drops the connection, so the client sees
    a body without its end. Already logged and counted."""
    already_reported = True


class StreamedResponse(Response):
    """Sends a StreamJob (see the module docstring); `headers` go out with the first piece."""

    def __init__(self, job: StreamJob, ticket: Ticket, headers: dict[str, str], metrics):
        self.job, self.ticket, self.metrics = job, ticket, metrics
        self.status_code = 200
        self.media_type = job.media_type
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
            # job now, which aborts its engine requests (their KV pages return at once)
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
                self.job.finished(self.outcome)
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, _ClientGone):
            raise error               # a raw stream failed after its status line: drop the connection

    def _count(self, error: ApiError) -> None:
        self.metrics.errors.labels(error.type, error.code or "-").inc()

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
            hold = None
            if job.deadline_admitted:
                try:
                    hold = self.ticket.hold_stream(realtime=not job.whole, now=time.monotonic())
                except ApiError as error:     # deadline_risk: refused at once, before waiting for a slot
                    self.outcome = "refused"
                    self._count(error)
                    await error.response()({"type": "http"}, _no_receive, emit)
                    return
            await self.ticket.acquire()
            try:
                first = await anext(pieces, None)
            except Exception as exc:  # noqa: BLE001 - every failure before the first piece is a JSON error
                error = job.error(exc)
                self._count(error)
                await error.response()({"type": "http"}, _no_receive, emit)
                return
            raw = list(self.raw_headers)
            if job.whole and first is not None:
                raw.append((b"content-length", str(len(first)).encode()))
            await emit({"type": "http.response.start", "status": 200, "headers": raw})
            started = True
            if first is not None:
                await emit({"type": "http.response.body", "body": first, "more_body": True})
                _report_sent(hold, job)
                job.first_sent()
            async for piece in pieces:
                await emit({"type": "http.response.body", "body": piece, "more_body": True})
                _report_sent(hold, job)
            self._ending = True
            await emit({"type": "http.response.body", "body": b"", "more_body": False})
            self.outcome = "ok"
        except _ClientGone:
            self.outcome = "cancelled"
            raise
        except Exception as exc:      # noqa: BLE001 - after the status line: end the stream
            if not started:
                raise
            error = job.error(exc)    # logged there
            self._count(error)
            if not job.sse:
                raise StreamFailed(error.message) from exc
            await emit({"type": "http.response.body", "body": job.error_event(error), "more_body": False})
        finally:
            await pieces.aclose()


def _report_sent(hold: StreamHold | None, job: StreamJob) -> None:
    """A piece has been handed to the connection: its audio, if any, is a chunk of the stream."""
    audio_s = job.pop_audio_seconds()
    if hold is not None and audio_s > 0:
        hold.sent(time.monotonic(), audio_s)


async def _wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _no_receive():
    return {"type": "http.disconnect"}
