"""An asyncio front of the engine for servers: add a request, iterate its outputs, abort it.

The engine runs in one background thread (GPU work and host bookkeeping happen there); callers on
the event loop only tokenize and validate their requests and read per-request queues.

A request that fails at run time because of itself (its logits processors, its sampling values;
see engine/llm_engine.py) ends its own stream: `generate` raises that typed error to its consumer,
and the engine goes on serving the others. Only a fault of the engine itself (a device error, a
bug) stops the loop; then every open stream raises `EngineDeadError` at once, as does every later
`generate`. `shutdown` ends open streams the same way.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from typing import AsyncIterator

from .config import EngineConfig
from .errors import EngineDeadError, InvalidRequestError
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger("stepvox")


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()       # guards _streams and _dead_reason together
        self._dead_reason: str | None = None
        self._dead_cause: BaseException | None = None
        self._stopped = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="stepvox-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model_path: str, **engine_options) -> "AsyncLLMEngine":
        return cls(LLMEngine(model_path, EngineConfig(**engine_options)))

    @property
    def is_dead(self) -> bool:
        return self._dead_reason is not None

    def _dead_error(self) -> EngineDeadError:
        # a fresh exception per waiter: one raised in several coroutines would share a traceback
        error = EngineDeadError(self._dead_reason)
        error.__cause__ = self._dead_cause
        return error

    # ---------------------------------------------------------------- caller side
    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (cumulative text/tokens plus the new part) until it finishes.
        Raises the request's own typed error if it fails (InvalidRequestError, KVCacheExhaustedError)
        and EngineDeadError if the engine stops."""
        if self.is_dead:
            raise self._dead_error()
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        seq = self.engine.make_sequence(prompt, params, request_id)   # validation errors raise here
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:                  # registered before the loop can die unseen, or refused
            if self.is_dead:
                raise self._dead_error()
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, stream)
        self._commands.put(("add", seq))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):     # refused by the engine, or the engine stopped
                    finished = True
                    raise item
                if item.error is not None:              # failed alone; the engine has let it go
                    finished = True
                    raise item.error
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:          # the caller stopped listening: free the request's pages
                self._commands.put(("abort", request_id))
                self._wake.set()
            with self._lock:
                self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ---------------------------------------------------------------- engine thread
    def _send(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:          # the consumer's event loop is closed: nobody listens any more
            with self._lock:
                self._streams.pop(request_id, None)
            self._commands.put(("abort", request_id))

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_sequence(arg)
                except InvalidRequestError as error:   # e.g. its id still held by an aborted request
                    self._send(arg.request_id, error)
            elif kind == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:
                    self._send(out.request_id, out)

    def _loop(self) -> None:
        cause = None
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._send(out.request_id, out)
        except BaseException as exc:  # noqa: BLE001 - a fault of the engine: every waiter must learn it
            cause = exc
            log.exception("the engine loop failed; every open and later request gets EngineDeadError")
        finally:
            self._close_streams(cause)

    def _close_streams(self, cause: BaseException | None) -> None:
        """Mark the engine dead and end every open stream with EngineDeadError."""
        with self._lock:
            self._dead_cause = cause
            self._dead_reason = ("the engine was shut down" if cause is None
                                 else f"the engine loop failed: {type(cause).__name__}: {cause}")
            targets = list(self._streams.items())
        for request_id, _ in targets:
            self._send(request_id, self._dead_error())
