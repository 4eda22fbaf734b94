"""The router's in-flight bound with a queue in front of it: a request that finds `max_inflight` requests in
flight waits for a slot instead of being refused, and freed slots go to the waiting requests by priority class
first, then by age (engine/priority.py). The queue is bounded (`max_queued`; 0 keeps the old behaviour: refuse
at once) and so is each wait (`timeout_s`); past either the request is refused with RESOURCE_EXHAUSTED.

NOTE: on the event loop, no I/O: a heap of futures. A slot is handed from `release` straight to the waiter it
wakes, so a new arrival never takes a slot that a queued request was given.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from engine.priority import Priority


class AdmissionRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdmissionQueue:
    def __init__(self, max_inflight: int, max_queued: int = 0, timeout_s: float = 30.0) -> None:
        self.max_inflight, self.max_queued, self.timeout_s = max_inflight, max_queued, timeout_s
        self.used = 0  # slots held by admitted requests
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []  # (class, arrival order, its wake-up)
        self._order = itertools.count()
        self.admitted_after_wait = 0
        self.timed_out = 0

    @property
    def queued(self) -> int:
        return sum(not f.done() for _, _, f in self._heap)

    async def acquire(self, priority: Priority) -> float:
        """Take a slot, waiting for one if need be; returns the seconds waited. AdmissionRefused when the queue
        is full (or off) or the wait passes `timeout_s`."""
        if self.used < self.max_inflight and not self.queued:
            self.used += 1
            return 0.0
        if self.queued >= self.max_queued:
            why = "server.max_queued requests already wait" if self.max_queued else "no admission queue"
            raise AdmissionRefused(f"admission refused: {self.used} requests in flight (server.max_inflight) and "
                                   f"{why}")
        loop = asyncio.get_running_loop()
        start = loop.time()
        wake: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._heap, (int(priority), next(self._order), wake))
        try:
            await asyncio.wait_for(asyncio.shield(wake), self.timeout_s)
        except TimeoutError:
            if wake.done() and not wake.cancelled():  # the slot came as the wait ended: keep it
                self.admitted_after_wait += 1
                return loop.time() - start
            wake.cancel()
            self.timed_out += 1
            raise AdmissionRefused(f"admission refused: no slot within {self.timeout_s:g} s "
                                   f"(server.admission_timeout_s; {self.used} in flight)") from None
        except BaseException:  # cancelled (client gone): give back a slot handed over meanwhile
            if wake.done() and not wake.cancelled():
                self.release()
            else:
                wake.cancel()
            raise
        self.admitted_after_wait += 1
        return loop.time() - start

    def release(self) -> None:
        """A request left: its slot goes to the first waiter by (class, age), else back to the pool."""
        while self._heap:
            _, _, wake = heapq.heappop(self._heap)
            if not wake.done():
                wake.set_result(None)  # NOTE: the slot moves to it; `used` stays
                return
        self.used -= 1
