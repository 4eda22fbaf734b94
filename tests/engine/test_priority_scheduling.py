"""Priority classes in the scheduler: waiting requests go by (class, arrival), preemption takes the lowest class,
then the newest (no model involved)."""

import pytest

from engine.kv_cache_manager import KVCacheManager
from engine.priority import Priority
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

I, B = Priority.INTERACTIVE, Priority.BATCH


def make(num_blocks: int = 32, budget: int = 64, max_seqs: int = 8) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size=4, enable_caching=False, salt="t")
    return Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget)


def req(name: str, n: int, arrival: int, priority: Priority) -> Request:
    return Request(name, list(range(1, n + 1)), SamplingParams(max_tokens=8, priority=priority), arrival)


def step(s: Scheduler) -> list[tuple[str, int]]:
    out = s.schedule()
    s.update_after_step(out)
    for r in out.requests:
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(7)
    return [(r.request_id, n) for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)]


def test_waiting_requests_are_admitted_by_class_then_age() -> None:
    s = make(budget=64, max_seqs=3)
    for name, arrival, prio in (("b0", 0, B), ("b1", 1, B), ("i2", 2, I), ("b3", 3, B), ("i4", 4, I)):
        s.add(req(name, 4, arrival, prio))
    assert [r.request_id for r in s.waiting] == ["i2", "i4", "b0", "b1", "b3"]
    # three sequence slots: the two interactive ones and the oldest batch one, in that order
    assert step(s) == [("i2", 4), ("i4", 4), ("b0", 4)]
    assert [r.request_id for r in s.waiting] == ["b1", "b3"]
    s.add(req("i5", 4, 5, I))
    assert [r.request_id for r in s.waiting] == ["i5", "b1", "b3"]


def test_an_interactive_prefill_takes_the_budget_before_an_older_batch_prefill() -> None:
    s = make(budget=8)
    s.add(req("b0", 20, 0, B))
    assert step(s) == [("b0", 8)]
    s.add(req("i1", 6, 1, I))
    # both are prefilling now: the interactive one first, the batch one gets what is left
    assert step(s) == [("i1", 6), ("b0", 2)]
    assert step(s) == [("i1", 1), ("b0", 7)]


def test_preemption_takes_the_lowest_class_first_then_the_newest() -> None:
    s = make(num_blocks=6, budget=32)
    s.add(req("i0", 8, 0, I))  # 2 blocks each: the pool is full after the first step
    s.add(req("b1", 8, 1, B))
    s.add(req("i2", 8, 2, I))
    assert step(s) == [("i0", 8), ("i2", 8), ("b1", 8)]
    # i0 needs a 3rd block: the victim is b1 (batch), not i2 (interactive, and newer than b1)
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["b1"]
    assert s.waiting[0].request_id == "b1" and s.waiting[0].status is RequestStatus.PREEMPTED


def test_preemption_within_one_class_takes_the_newest() -> None:
    s = make(num_blocks=6, budget=32)
    for name, arrival in (("b0", 0), ("b1", 1), ("b2", 2)):
        s.add(req(name, 8, arrival, B))
    step(s)
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["b2"]


def test_a_preempted_batch_request_waits_behind_a_newer_interactive_one() -> None:
    s = make(num_blocks=6, budget=32)
    s.add(req("i0", 8, 0, I))
    s.add(req("b1", 8, 1, B))
    s.add(req("i2", 8, 2, I))
    step(s)
    s.add(req("i3", 4, 3, I))
    s.schedule()  # b1 preempted; i3 cannot be admitted in a step that preempted
    assert [r.request_id for r in s.waiting] == ["i3", "b1"]


def test_priority_is_validated() -> None:
    with pytest.raises(ValueError, match="priority must be a Priority"):
        SamplingParams(priority=1)  # type: ignore[arg-type]
    assert Priority.parse("Batch") is B
    with pytest.raises(ValueError, match="interactive, batch"):
        Priority.parse("urgent")


def loaded(name: str, n: int, arrival: int, priority: Priority, s: Scheduler) -> Request:
    """A request whose prompt KV was loaded from a prefill instance: it holds its blocks and its first token."""
    r = req(name, n, arrival, priority)
    assert s.kv.allocate_slots(r, n)
    r.num_computed_tokens = n
    r.append_token(7)
    return r


@pytest.mark.parametrize("head", [I, B])
def test_a_blocked_head_does_not_hold_up_requests_that_hold_their_kv(head: Priority) -> None:
    s = make(num_blocks=6, budget=64)
    s.add(req("p0", 16, 0, head))  # a preempted request: recomputes 16 tokens, 4 blocks
    done = loaded("k1", 8, 1, B, s)  # 2 blocks held: only 4 free, then...
    s.add(done)
    assert s.kv.allocate_slots(req("other", 4, 9, B), 4)  # ...3 after another request's block
    # p0 cannot get its 4 blocks: k1 (its KV loaded) is admitted past it and decodes, so its blocks come back
    assert step(s) == [("k1", 1)]
    assert [r.request_id for r in s.waiting] == ["p0"]
