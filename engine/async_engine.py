"""An asyncio front of the engine for servers: add a request, iterate its outputs, abort it.

The engine runs in one background thread (GPU work and host bookkeeping happen there); callers on
the event loop only tokenize and validate their requests and read per-request queues.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import traceback
from typing import AsyncIterator

from .config import EngineConfig
from .errors import EngineDeadError, InvalidRequestError
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

_STOP = object()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._dead: Exception | None = None
        self._stopped = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="stepvox-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model_path: str, **engine_options) -> "AsyncLLMEngine":
        return cls(LLMEngine(model_path, EngineConfig(**engine_options)))

    # ---------------------------------------------------------------- caller side
    async def generate(self, prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (cumulative text/tokens plus the new part) until it finishes."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop failed: {self._dead!r}") from self._dead
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        seq = self.engine.make_sequence(prompt, params, request_id)   # validation errors raise here
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, stream)
        self._commands.put(("add", seq))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"the engine loop failed: {item!r}") from item
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
    def _deliver(self, out) -> None:
        with self._lock:
            target = self._streams.get(out.request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, out)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.add_sequence(arg)
            elif kind == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:
                    self._deliver(out)

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
        except Exception as exc:  # noqa: BLE001 - every waiter must learn that the loop died
            traceback.print_exc()
            self._dead = exc
            with self._lock:
                targets = list(self._streams.values())
            for loop, stream in targets:
                loop.call_soon_threadsafe(stream.put_nowait, exc)
