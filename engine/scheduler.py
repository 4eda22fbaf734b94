"""Iteration-level scheduler: continuous batching, chunked prefill, preemption by recompute.

Each step spends a token budget (`max_num_batched_tokens`) over at most `max_num_seqs` running requests:
  1. running requests that are decoding (one token each), oldest first;
  2. running requests still in (chunked) prefill, oldest first, each taking what budget is left;
  3. waiting requests, FIFO, after a prefix-cache lookup, while budget, sequence slots and blocks last.
When a running request cannot get a block, the newest running request not yet scheduled this step is
preempted (its blocks freed, its computed tokens reset to zero, back to the head of the queue); if there is
none, the request itself is. Because a single request always fits (EngineConfig checks that), the oldest
request always progresses: no deadlock.
"""

from __future__ import annotations

from collections import deque
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
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # kept in arrival order
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: set[int] = set()
        budget = self.max_num_batched_tokens

        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for request in decoding + prefilling:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
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

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            request = self.waiting[0]
            hits = self.kv.get_computed_blocks(request)
            num_computed = request.num_computed_tokens + len(hits) * self.kv.block_size
            n = request.num_tokens - num_computed
            if n > budget:
                if not self.enable_chunked_prefill:
                    break
                n = budget
            if not self.kv.allocate_slots(request, n, hits):
                break
            self.waiting.popleft()
            if request.status is RequestStatus.WAITING and request.num_computed_tokens == 0:
                # First admission of a fresh request (not a resumed or remotely prefilled one): record its hits.
                request.num_cached_tokens = len(hits) * self.kv.block_size
            request.num_computed_tokens = num_computed
            request.num_cached_blocks = len(hits)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.requests.append(request)
            out.num_scheduled_tokens.append(n)
            budget -= n
        self.running.sort(key=lambda r: r.arrival)
        return out

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
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
