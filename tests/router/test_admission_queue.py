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
