"""The engine's side of its KV connector (engine/kv_connector.py): requests whose prompt KV is loaded from
elsewhere, and blocks that outlive their request. All of that bookkeeping lives here, not in LLMEngine.

Blocks owned by no live request:
  - held: a finished request's blocks kept for a reader (the prefill role), until the connector reports them
    `released` (the reader is done, or its lease expired) or the request is aborted;
  - quarantined: blocks a failed or cancelled read may still write into, until the connector reports the read
    `settled`. Their request prefills into fresh blocks meanwhile (or, if aborted, is gone).

A load that finds no room waits (`pending`, by class then arrival, as the scheduler orders requests) instead of
being refused: its prompt's KV is already computed and held on the prefill instance, so refusing it would throw
that work away and fail the request. Each step starts the pending loads in order while blocks last, keeping one
free block per running request for its next token (or starting it would preempt, i.e. recompute, one of them).
A load that waits past the prefill side's lease finds its source released and is prefilled here instead (the
failed-load path, counted as a fallback). Counted: `kv_loads_queued` (loads that had to wait).
What the router says of a waiting load's prefill applies to it too: a finished prefill's hand-off is kept for
when the load starts (`source_ready`), and a failed prefill ends the wait (`source_lost`: prefilled here,
counted as a fallback). NOTE: the connector knows only loads it started, so it would drop either word.
A failed prefill's word on a request this instance does not have yet is kept a while (`lost_early`,
engine/expiring_ids.py): Ray does not keep an async actor's calls in order, so the word can overtake the request
it is about, which is then prefilled here at once when it comes (a fallback, counted as `kv_lost_before_request`
too). NOTE: a finished prefill's hand-off that comes first is not kept: it only backs up the holder's own stream
messages, which the connector keeps when they come first.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import Any

from engine.errors import NoKVSpaceError
from engine.expiring_ids import ExpiringIds
from engine.kv_cache_manager import KVCacheManager
from engine.kv_connector import KVConnector, KVConnectorEvents
from engine.metrics import EngineMetrics
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler

log = logging.getLogger(__name__)

Emit = Callable[[Request, int], RequestOutput]


class RemoteKV:
    def __init__(self, connector: KVConnector, kv: KVCacheManager, scheduler: Scheduler,
                 metrics: EngineMetrics) -> None:
        self.connector, self.kv, self.scheduler, self.metrics = connector, kv, scheduler, metrics
        self.held: dict[str, Request] = {}
        self.quarantined: dict[str, list[int]] = {}
        # loads waiting for room, sorted by Request.order (class, arrival), each with its source
        self.pending: list[tuple[Request, Any]] = []
        self.loading: set[str] = set()  # requests waiting for their KV (pending or in flight)
        self.handoffs: dict[str, Any] = {}  # pending loads whose prefill finished: its source, for their start
        self.lost_early = ExpiringIds()  # failed prefills of requests not here (yet)
        self._free_when_stuck = -1  # free blocks when the head of `pending` last found no room

    def start_load(self, request: Request, source: Any) -> int:
        """Reserve blocks for the prompt (prefix-cache hits reused) and have the connector load the rest, or,
        without room now, queue the load (`pending`). The request waits outside the scheduler until `apply` sees
        its load finish. Returns the blocks being loaded (0 while it waits), or None when the router said before
        the request came that its prefill failed: the caller prefills it here (a fallback, counted). Raises
        NoKVSpaceError for a prompt larger than the whole cache, ValueError for a source the connector refuses."""
        blocks = -(-request.num_prompt_tokens // self.kv.block_size)
        if blocks > self.kv.pool.num_blocks:
            raise NoKVSpaceError(f"the {request.num_prompt_tokens}-token prompt needs {blocks} KV blocks; this "
                                 f"instance's cache has {self.kv.pool.num_blocks}")
        if self.lost_early and self.lost_early.take(request.request_id):
            self.metrics.count("kv_lost_before_request")
            log.warning("request %s: the router said its prefill failed before the request came: prefilling it here",
                        request.request_id)
            self._fall_back(request, "PrefillLost")
            return None
        request.status = RequestStatus.WAITING_FOR_KV
        ahead = self.pending and self.pending[0][0].order <= request.order  # NOTE: no overtaking within a class
        if not ahead:
            loading = self._try_start(request, source)
            if loading is not None:
                self.loading.add(request.request_id)
                return loading
        self.loading.add(request.request_id)
        bisect.insort(self.pending, (request, source), key=lambda e: e[0].order)
        self.metrics.count("kv_loads_queued")
        log.debug("no KV room for %s's %d-token prompt now: its load waits (%d waiting)", request.request_id,
                  request.num_prompt_tokens, len(self.pending))
        return 0

    def start_pending(self) -> list[Request]:
        """Start the waiting loads in order while there is room (each step, before scheduling). Returns the
        requests whose source the connector refused now: the caller prefills them locally."""
        refused: list[Request] = []
        if not self.pending or self.kv.pool.num_free_blocks <= self._free_when_stuck:
            return refused  # NOTE: nothing freed since the head last found no room: skip its prefix lookup
        while self.pending:
            request, source = self.pending[0]
            try:
                started = self._try_start(request, source)
            except ValueError as e:
                log.warning("the KV source of %s was refused after it waited: prefilling it here (%s)",
                            request.request_id, e)
                self._fall_back(request, "ValueError")
                started = 0
                refused.append(request)
            if started is None:
                self._free_when_stuck = self.kv.pool.num_free_blocks
                return refused
            self.pending.pop(0)
        self._free_when_stuck = -1
        return refused

    def _try_start(self, request: Request, source: Any) -> int | None:
        """Allocate and start the load if the blocks are free, keeping one per running request; None if not."""
        bs = self.kv.block_size
        hits = self.kv.get_computed_blocks(request)
        if not self.kv.allocate_slots(request, request.num_prompt_tokens - len(hits) * bs, hits,
                                      keep_free=len(self.scheduler.running)):
            return None
        request.num_cached_tokens, request.num_cached_blocks = len(hits) * bs, len(hits)
        try:
            loading = self.connector.start_load(request, source, len(hits))
        except BaseException:
            self.kv.free(request)
            raise
        handoff = self.handoffs.pop(request.request_id, None)
        if handoff is not None:
            self.connector.source_ready(request.request_id, handoff)
        return loading

    def source_ready(self, request_id: str, source: Any) -> None:
        """The router passes on a loading request's finished source: kept for a load still waiting for room,
        else for the connector."""
        if self._waiting(request_id) is None:
            self.connector.source_ready(request_id, source)
        else:
            self.handoffs[request_id] = source

    def source_lost(self, request_id: str) -> Request | None:
        """The prefill computing a loading request's prompt failed. A load still waiting for room is dropped and
        its request returned, to be prefilled here (a fallback, logged and counted); a started one is the
        connector's to fail (its `poll` reports it). The caller passes a word on a request it does not have to
        `lost_before_request` instead."""
        i = self._waiting(request_id)
        if i is None:
            self.connector.source_lost(request_id)
            return None
        request, _ = self.pending.pop(i)
        log.warning("request %s: its prefill failed while its KV load waited for room: prefilling it here",
                    request_id)
        self._fall_back(request, "PrefillLost")
        return request

    def lost_before_request(self, request_id: str) -> None:
        """The prefill of a request this instance does not have failed: kept for the request's arrival, and told
        to the connector (which counts a word on no pull of its own)."""
        self.lost_early.add(request_id)
        self.connector.source_lost(request_id)

    def _waiting(self, request_id: str) -> int | None:
        return next((i for i, (r, _) in enumerate(self.pending) if r.request_id == request_id), None)

    def _fall_back(self, request: Request, why: str) -> None:
        """A load that never started: its request is prefilled here (the caller schedules it)."""
        self.loading.discard(request.request_id)
        self.handoffs.pop(request.request_id, None)
        request.kv_load_failed = True
        self.metrics.count("kv_load_fallbacks")
        self.metrics.count(f"kv_load_fallbacks_{why}")

    def cancel_load(self, request: Request) -> None:
        """An aborted request that was waiting for its KV (or one its first token finished): free its blocks, or
        quarantine them while a read may still write into them (or, if its load had not started, forget it)."""
        self.loading.discard(request.request_id)
        self.handoffs.pop(request.request_id, None)
        i = self._waiting(request.request_id)
        if i is not None:
            del self.pending[i]
            return
        if self.connector.cancel_load(request.request_id):
            self.kv.free(request)
        else:
            self._quarantine(request)

    def finish(self, request: Request) -> Any | None:
        """A request finished (its status set, out of the scheduler, blocks still allocated): free its blocks,
        or hold them when the connector hands its KV to a reader. Returns the hand-off."""
        if request.request_id in self.loading:  # NOTE: its first token (sent early) ended it: stop the load
            self.cancel_load(request)
            return None
        handoff = self.connector.request_finished(request)
        if handoff is None:
            self.kv.free(request)
        else:
            self.held[request.request_id] = request
        return handoff

    def drop_held(self, request_id: str) -> bool:
        """Abort of a finished request whose blocks are held: free them now. False if it holds none."""
        request = self.held.pop(request_id, None)
        if request is None:
            return False
        self.kv.free(request)
        self.connector.drop_held(request_id)
        return True

    def apply(self, events: KVConnectorEvents, requests: dict[str, Request], emit: Emit) -> list[RequestOutput]:
        """Act on what the connector reports: loaded prompts join the scheduler to decode (their first token is
        emitted now), failed ones are prefilled here instead, settled and released blocks are freed."""
        outputs: list[RequestOutput] = []
        for first in events.first_tokens:
            # NOTE: the first token does not need the KV here (it was sampled where the prompt was computed), so
            # it goes out as soon as it is known; the KV is needed for the second
            request = requests.get(first.request_id)
            if request is not None and request.status is RequestStatus.WAITING_FOR_KV and not request.num_output_tokens:
                outputs.append(emit(request, first.first_token))
        for done in events.loaded:
            request = requests.get(done.request_id)
            if request is None:  # NOTE: its first token, earlier in this poll, ended it (cancel_load freed it)
                continue
            assert request.status is RequestStatus.WAITING_FOR_KV
            self.loading.discard(done.request_id)
            request.num_computed_tokens = request.num_prompt_tokens
            self.kv.cache_full_blocks(request)  # the loaded blocks are now valid prefix-cache entries
            request.status = RequestStatus.WAITING
            if not request.num_output_tokens:
                outputs.append(emit(request, done.first_token))
            if not request.finished:
                self.scheduler.add(request)
        for failed in events.failed:
            request = requests.get(failed.request_id)
            if request is None:  # NOTE: as above: ended by its first token in this poll, its blocks dealt with
                continue
            assert request.status is RequestStatus.WAITING_FOR_KV
            self.loading.discard(failed.request_id)
            if failed.settled:
                self.kv.free(request)
            else:
                self._quarantine(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
            request.kv_load_failed = True
            self.metrics.count("kv_load_fallbacks")
            self.metrics.count(f"kv_load_fallbacks_{type(failed.error).__name__}")
            self.scheduler.add(request)
        for request_id in events.settled:
            blocks = self.quarantined.pop(request_id, None)
            if blocks:
                self.kv.pool.free(reversed(blocks))
        for request_id in events.released:
            request = self.held.pop(request_id, None)
            if request is not None:
                self.kv.free(request)
        return outputs

    def _quarantine(self, request: Request) -> None:
        self.quarantined[request.request_id] = request.block_ids
        request.block_ids, request.num_cached_blocks = [], 0
