"""Iteration-level scheduler: continuous batching, chunked prefill, preemption by recompute.

Requests are ordered by (priority class, arrival) (engine/priority.py: interactive before batch, then oldest
first). Each step spends a token budget (`max_num_batched_tokens`) over at most `max_num_seqs` running requests:
  1. running requests that are decoding (one token each), in that order;
  2. per class: the running requests of that class still in (chunked) prefill, each taking what budget is left,
     then its waiting requests, after a prefix-cache lookup, while budget, sequence slots and blocks last.
When a running request cannot get a block, the last running request in that order (the lowest class, then the
newest) not yet scheduled this step is preempted (its blocks freed, its computed tokens reset to zero, back into
the queue at its place); if there is none, the request itself is. Because a single request always fits
(EngineConfig checks that), the first request in that order always progresses: no deadlock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """The work of one step: requests in batch order with how many of their tokens to compute."""

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # NOTE: both kept sorted by Request.order (class, arrival): a sorted list, not a heap, because finish()
        # removes from the middle and schedule() peeks the head
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=_order)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: set[int] = set()
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        budget = self._run(decoding, self.max_num_batched_tokens, out, scheduled)
        # NOTE: by class: a waiting interactive prompt gets the budget before a running batch prefill does, or
        # a long batch prompt in chunked prefill would hold an interactive request's first token for its length
        for cls in sorted({r.order[0] for r in prefilling} | {r.order[0] for r in self.waiting}):
            budget = self._run([r for r in prefilling if r.order[0] == cls], budget, out, scheduled)
            budget = self._admit(cls, budget, out, scheduled)
        self.running.sort(key=_order)
        return out

    def _run(self, requests: list[Request], budget: int, out: SchedulerOutput, scheduled: set[int]) -> int:
        """Schedule running requests in order while budget lasts, preempting for blocks. Returns the budget left."""
        for request in requests:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, n):
                victim = self._pick_victim(request, scheduled)
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                out.requests.append(request)
                out.num_scheduled_tokens.append(n)
                scheduled.add(id(request))
                budget -= n
        return budget

    def _admit(self, cls: int, budget: int, out: SchedulerOutput, scheduled: set[int]) -> int:
        """Admit waiting requests of class `cls` in order while budget, sequence slots and blocks last (none
        after a preemption in this step). Returns the budget left.

        NOTE: once one cannot get its blocks (or a request of a higher class still waits), only requests that
        already hold theirs (a prompt whose KV was loaded from a prefill instance: it needs one token's room) are
        admitted past it. Stopping there would deadlock: loaded requests waiting behind a preempted one would
        keep the blocks it waits for, forever."""
        i = bisect.bisect_left(self.waiting, (cls, -1), key=_order)  # the first of this class
        blocked = i > 0  # a request of a higher class still waits
        while i < len(self.waiting) and self.waiting[i].order[0] == cls and budget > 0 and \
                len(self.running) < self.max_num_seqs and not out.preempted:
            request = self.waiting[i]
            if blocked and not request.block_ids:
                i += 1
                continue
            hits = self.kv.get_computed_blocks(request)
            num_computed = request.num_computed_tokens + len(hits) * self.kv.block_size
            n = request.num_tokens - num_computed
            if n > budget:
                if not self.enable_chunked_prefill:
                    blocked, i = True, i + 1
                    continue
                n = budget
            if not self.kv.allocate_slots(request, n, hits):
                blocked, i = True, i + 1
                continue
            self.waiting.pop(i)
            if request.status is RequestStatus.WAITING and request.num_computed_tokens == 0:
                # First admission of a fresh request (not a resumed or remotely prefilled one): record its hits.
                request.num_cached_tokens = len(hits) * self.kv.block_size
            request.num_computed_tokens = num_computed
            request.num_cached_blocks = len(hits)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.requests.append(request)
            out.num_scheduled_tokens.append(n)
            scheduled.add(id(request))
            budget -= n
        return budget

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance num_computed_tokens by what was just computed and publish completed blocks. Requests that
        finished meanwhile (async scheduling reads a step's tokens after launching the next) are skipped."""
        for request, n in zip(out.requests, out.num_scheduled_tokens, strict=True):
            if request.finished:
                continue
            request.num_computed_tokens += n
            self.kv.cache_full_blocks(request)

    def finish(self, request: Request, status: RequestStatus, free_blocks: bool = True) -> None:
        """Retire a request (done, or aborted at any point): drop it from the queues and free its blocks
        (unless `free_blocks` is False: the caller then owns them and must `kv.free` the request later)."""
        if request.finished:
            return
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        if free_blocks:
            self.kv.free(request)

    def _pick_victim(self, request: Request, scheduled: set[int]) -> Request:
        for candidate in reversed(self.running):
            if candidate is not request and id(candidate) not in scheduled:
                return candidate
        return request

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.add(victim)
        out.preempted.append(victim)


def _order(request: Request) -> tuple[int, int]:
    return request.order
