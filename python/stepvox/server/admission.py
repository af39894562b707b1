"""Admission: at most `max_concurrent` requests run model work at once and `max_queue` more wait for
a slot, in arrival order; a request beyond both is refused at once (429 with Retry-After), so a
burst costs the server nothing it cannot serve. Speech, chat and transcription requests share the
one queue: they share the engines."""
from __future__ import annotations

import asyncio

from .errors import ApiError


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
