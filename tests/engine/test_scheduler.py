"""Scheduler: token budget, chunked prefill, decode priority, preemption order (no model involved)."""

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def make(num_blocks: int = 16, budget: int = 8, max_seqs: int = 4, chunked: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size=4, enable_caching=False, salt="t")
    return Scheduler(kv, max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)


def req(n: int, arrival: int) -> Request:
    return Request(f"r{arrival}", list(range(1, n + 1)), SamplingParams(max_tokens=8), arrival)


def step(s: Scheduler) -> list[tuple[str, int]]:
    out = s.schedule()
    s.update_after_step(out)
    for r in out.requests:  # emulate sampling for requests that reached their end
        if r.num_computed_tokens == r.num_tokens:
            r.append_token(7)
    return [(r.request_id, n) for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)]


def test_long_prompt_is_chunked_and_decodes_go_first() -> None:
    s = make(budget=8)
    s.add(req(3, 0))
    assert step(s) == [("r0", 3)]
    s.add(req(20, 1))
    # r0 decodes one token; r1 gets the remaining 7 tokens of budget.
    assert step(s) == [("r0", 1), ("r1", 7)]
    assert step(s) == [("r0", 1), ("r1", 7)]
    assert step(s) == [("r0", 1), ("r1", 6)]
    assert step(s) == [("r0", 1), ("r1", 1)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    s = make(budget=8, chunked=False)
    s.add(req(6, 0))
    s.add(req(5, 1))
    assert step(s) == [("r0", 6)]
    assert step(s) == [("r0", 1), ("r1", 5)]


def test_max_num_seqs_caps_the_batch() -> None:
    s = make(budget=64, max_seqs=2)
    for i in range(3):
        s.add(req(2, i))
    assert [rid for rid, _ in step(s)] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_preemption_frees_newest_request_and_requeues_it_first() -> None:
    s = make(num_blocks=4, budget=16)
    s.add(req(8, 0))  # 2 full blocks
    s.add(req(8, 1))  # 2 full blocks: pool now full
    assert step(s) == [("r0", 8), ("r1", 8)]
    # r0 now needs a 3rd block for its 9th token: r1 (newest, not yet scheduled this step) is preempted.
    out = s.schedule()
    assert [r.request_id for r in out.preempted] == ["r1"]
    assert [(r.request_id, n) for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)] == [("r0", 1)]
    r1 = s.waiting[0]
    assert r1.request_id == "r1" and r1.status is RequestStatus.PREEMPTED and r1.num_computed_tokens == 0
    assert r1.block_ids == [] and r1.num_preemptions == 1


def test_finish_frees_blocks_from_any_state() -> None:
    s = make(num_blocks=8, budget=4)
    a, b = req(6, 0), req(6, 1)
    s.add(a)
    s.add(b)
    step(s)  # a partially prefilled (4 of 6), b waiting
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished() and s.kv.pool.num_free_blocks == 8
