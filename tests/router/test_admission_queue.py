"""The router's admission queue: slots up to max_inflight at once, then a bounded wait in which freed slots go
by priority class, then age; refusals when the queue is full or off and when a wait times out; a waiter that
is cancelled leaks no slot."""

from __future__ import annotations

import asyncio

import pytest

from engine.priority import Priority
from router.admission_queue import AdmissionQueue, AdmissionRefused

I, B = Priority.INTERACTIVE, Priority.BATCH


def test_no_queue_refuses_at_once_past_the_bound() -> None:
    async def run() -> None:
        q = AdmissionQueue(2)
        assert await q.acquire(B) == 0.0 and await q.acquire(B) == 0.0
        with pytest.raises(AdmissionRefused, match="no admission queue"):
            await q.acquire(I)
        q.release()
        assert await q.acquire(I) == 0.0 and q.used == 2

    asyncio.run(run())


def test_freed_slots_go_by_class_then_age() -> None:
    async def run() -> None:
        q = AdmissionQueue(1, max_queued=8)
        await q.acquire(B)  # the one slot
        order: list[str] = []

        async def wait(name: str, p: Priority) -> None:
            await q.acquire(p)
            order.append(name)

        tasks = []
        for name, p in (("batch-a", B), ("inter-b", I), ("batch-c", B), ("inter-d", I)):
            tasks.append(asyncio.create_task(wait(name, p)))
            await asyncio.sleep(0)  # queued in this order
        assert q.queued == 4
        for _ in range(4):
            q.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["inter-b", "inter-d", "batch-a", "batch-c"]
        assert q.used == 1 and q.admitted_after_wait == 4
        waiting = [asyncio.create_task(q.acquire(B)) for _ in range(8)]  # 8 may wait...
        await asyncio.sleep(0)
        assert q.queued == 8
        with pytest.raises(AdmissionRefused, match="max_queued"):  # ...the 9th is refused
            await q.acquire(I)
        for t in waiting:
            t.cancel()

    asyncio.run(run())


def test_a_wait_times_out_and_a_cancelled_waiter_leaks_no_slot() -> None:
    async def run() -> None:
        q = AdmissionQueue(1, max_queued=4, timeout_s=0.05)
        await q.acquire(I)
        with pytest.raises(AdmissionRefused, match=r"no slot within 0\.05 s"):
            await q.acquire(I)
        assert q.timed_out == 1
        waiter = asyncio.create_task(AdmissionQueue.acquire(q, B))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        q.release()  # nobody waits any more: the slot goes back
        assert q.used == 0 and q.queued == 0
        assert await q.acquire(B) == 0.0

    asyncio.run(run())


def test_early_rejection_refuses_a_predicted_wait_over_the_slo_and_caps_the_wait_at_it() -> None:
    async def run() -> None:
        q = AdmissionQueue(1, max_queued=16, timeout_s=30.0)
        await q.acquire(I)  # the one slot
        assert q.expected_wait_s(B) is None  # no hand-off measured: nothing predicted, nothing refused
        waiters = [asyncio.create_task(q.acquire(B, slo_s=10.0)) for _ in range(3)]
        await asyncio.sleep(0)
        for _ in range(2):  # hand-offs while requests waited all along: intervals of ~20 ms
            await asyncio.sleep(0.02)
            q.release()
        await asyncio.sleep(0)
        assert q.handoff_interval_s is not None and 0.015 < q.handoff_interval_s < 0.5
        assert q.ahead(B) == 1 and q.ahead(I) == 0
        # a batch request would wait behind 1: 2 intervals; an interactive one behind none: 1 interval
        assert q.expected_wait_s(B) == pytest.approx(2 * q.handoff_interval_s)
        assert q.expected_wait_s(I) == pytest.approx(q.handoff_interval_s)
        with pytest.raises(AdmissionRefused, match="early rejection: 1 requests of its class") as e:
            await q.acquire(B, slo_s=q.handoff_interval_s * 1.5)
        assert e.value.reason == "slo" and q.slo_refused == 1
        # ...while an interactive request with the same SLO waits behind nobody, and is let in: its wait is
        # capped at the SLO (no slot comes), and refused for it, not for admission_timeout_s
        with pytest.raises(AdmissionRefused, match=r"no slot within the interactive class.s TTFT budget") as e:
            await q.acquire(I, slo_s=q.handoff_interval_s * 1.5)
        assert e.value.reason == "slo" and q.slo_refused == 2 and q.timed_out == 0
        q.release()
        await asyncio.gather(*waiters)
        assert q.queued == 0 and q.used == 1

    asyncio.run(run())
