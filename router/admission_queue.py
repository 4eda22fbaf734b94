"""The router's in-flight bound with a queue in front of it: a request that finds `max_inflight` requests in
flight waits for a slot instead of being refused, and freed slots go to the waiting requests by priority class
first, then by age (engine/priority.py). The queue is bounded (`max_queued`; 0 keeps the old behaviour: refuse
at once) and so is each wait (`timeout_s`); past either the request is refused with RESOURCE_EXHAUSTED.

With SLO-aware early rejection (router/admission.py) a request also brings its class's TTFT SLO: it is refused at
once when the wait the queue predicts for it (the waiters ahead of it in its class or a higher one, times the
measured interval between hand-offs) is over the SLO, and a wait never lasts longer than the SLO: a request that
has already missed its first token's deadline in the queue must not take a slot from one that can still meet it.

NOTE: on the event loop, no I/O: a heap of futures. A slot is handed from `release` straight to the waiter it
wakes, so a new arrival never takes a slot that a queued request was given.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from engine.priority import Priority

HANDOFF_SMOOTHING = 0.1  # weight of the newest interval in the smoothed interval between hand-offs


class AdmissionRefused(Exception):
    def __init__(self, message: str, reason: str = "max_inflight") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason  # the label of pdserve:requests_rejected_total: "max_inflight" or "slo"


class AdmissionQueue:
    def __init__(self, max_inflight: int, max_queued: int = 0, timeout_s: float = 30.0) -> None:
        self.max_inflight, self.max_queued, self.timeout_s = max_inflight, max_queued, timeout_s
        self.used = 0  # slots held by admitted requests
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []  # (class, arrival order, its wake-up)
        self._order = itertools.count()
        self.admitted_after_wait = 0
        self.timed_out = 0
        self.slo_refused = 0  # refused for their SLO: predicted at arrival, or their wait reached it
        # seconds between two hand-offs while requests waited all along (None: not measured yet)
        self.handoff_interval_s: float | None = None
        self._last_handoff: float | None = None  # when the last hand-off left waiters behind it

    @property
    def queued(self) -> int:
        return sum(not f.done() for _, _, f in self._heap)

    def ahead(self, priority: Priority) -> int:
        """Waiters that a request of `priority` queued now would wait behind (its class or a higher one)."""
        return sum(not f.done() and c <= priority for c, _, f in self._heap)

    def expected_wait_s(self, priority: Priority) -> float | None:
        """The wait a request of `priority` queued now can expect, or None before a hand-off interval has been
        measured. NOTE: a lower bound for a lower class: higher-class requests that arrive later go first."""
        if self.handoff_interval_s is None:
            return None
        return (self.ahead(priority) + 1) * self.handoff_interval_s

    async def acquire(self, priority: Priority, slo_s: float | None = None) -> float:
        """Take a slot, waiting for one if need be; returns the seconds waited. AdmissionRefused when the queue
        is full (or off) or the wait passes `timeout_s`; with `slo_s` (early rejection: the class's TTFT budget),
        also when the expected wait is over it and when the wait reaches it (reason "slo")."""
        if self.used < self.max_inflight and not self.queued:
            self.used += 1
            return 0.0
        if self.queued >= self.max_queued:
            why = "server.max_queued requests already wait" if self.max_queued else "no admission queue"
            raise AdmissionRefused(f"admission refused: {self.used} requests in flight (server.max_inflight) and "
                                   f"{why}")
        limit = self.timeout_s
        if slo_s is not None:
            expected = self.expected_wait_s(priority)
            if expected is not None and expected > slo_s:
                self.slo_refused += 1
                raise AdmissionRefused(
                    f"early rejection: {self.ahead(priority)} requests of its class or a higher one wait ahead of "
                    f"it, a predicted wait of {expected * 1e3:.0f} ms ({self.handoff_interval_s * 1e3:.1f} ms a "
                    f"slot) over the {priority.label} class's TTFT budget of {slo_s * 1e3:g} ms "
                    f"(admission.ttft_slo_ms less admission.slo_headroom); retry later", "slo")
            limit = min(limit, slo_s)
        if not self.queued:  # NOTE: the queue was empty (its waiters timed out): no interval runs across that
            self._last_handoff = None
        loop = asyncio.get_running_loop()
        start = loop.time()
        wake: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._heap, (int(priority), next(self._order), wake))
        try:
            await asyncio.wait_for(asyncio.shield(wake), limit)
        except TimeoutError:
            if wake.done() and not wake.cancelled():  # the slot came as the wait ended: keep it
                self.admitted_after_wait += 1
                return loop.time() - start
            wake.cancel()
            if limit < self.timeout_s:
                self.slo_refused += 1
                raise AdmissionRefused(f"early rejection: no slot within the {priority.label} class's TTFT budget "
                                       f"of {limit * 1e3:g} ms (admission.ttft_slo_ms less admission.slo_headroom; "
                                       f"{self.used} in flight)", "slo") from None
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
                self._handed_off()
                return
        self.used -= 1

    def _handed_off(self) -> None:
        """Measure the interval since the previous hand-off, when requests waited all along in between."""
        now = time.monotonic()
        if self._last_handoff is not None:
            dt = now - self._last_handoff
            old = self.handoff_interval_s
            self.handoff_interval_s = dt if old is None else HANDOFF_SMOOTHING * dt + (1 - HANDOFF_SMOOTHING) * old
        self._last_handoff = now if self.queued else None
