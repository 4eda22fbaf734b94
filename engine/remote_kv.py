"""The engine's side of its KV connector (engine/kv_connector.py): requests whose prompt KV is loaded from
elsewhere, and blocks that outlive their request. All of that bookkeeping lives here, not in LLMEngine.

Blocks owned by no live request:
  - held: a finished request's blocks kept for a reader (the prefill role), until the connector reports them
    `released` (the reader is done, or its lease expired) or the request is aborted;
  - quarantined: blocks a failed or cancelled read may still write into, until the connector reports the read
    `settled`. Their request prefills into fresh blocks meanwhile (or, if aborted, is gone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from engine.errors import NoKVSpaceError
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

    def start_load(self, request: Request, source: Any) -> int:
        """Reserve blocks for the prompt (prefix-cache hits reused) and have the connector load the rest. The
        request waits outside the scheduler until `apply` sees its load finish. Returns the blocks to load.
        Raises NoKVSpaceError when the cache has no room now, ValueError for a source the connector refuses."""
        bs = self.kv.block_size
        hits = self.kv.get_computed_blocks(request)
        if not self.kv.allocate_slots(request, request.num_prompt_tokens - len(hits) * bs, hits):
            raise NoKVSpaceError(f"no KV blocks free for the {request.num_prompt_tokens}-token prompt right now")
        request.status = RequestStatus.WAITING_FOR_KV
        request.num_cached_tokens, request.num_cached_blocks = len(hits) * bs, len(hits)
        try:
            return self.connector.start_load(request, source, len(hits))
        except BaseException:
            self.kv.free(request)
            raise

    def cancel_load(self, request: Request) -> None:
        """An aborted request that was waiting for its KV: free its blocks, or quarantine them while a read
        may still write into them."""
        if self.connector.cancel_load(request.request_id):
            self.kv.free(request)
        else:
            self._quarantine(request)

    def finish(self, request: Request) -> Any | None:
        """A request finished (its status set, out of the scheduler, blocks still allocated): free its blocks,
        or hold them when the connector hands its KV to a reader. Returns the hand-off."""
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
        for done in events.loaded:
            request = requests[done.request_id]
            assert request.status is RequestStatus.WAITING_FOR_KV
            request.num_computed_tokens = request.num_prompt_tokens
            self.kv.cache_full_blocks(request)  # the loaded blocks are now valid prefix-cache entries
            request.status = RequestStatus.WAITING
            outputs.append(emit(request, done.first_token))
            if not request.finished:
                self.scheduler.add(request)
        for failed in events.failed:
            request = requests[failed.request_id]
            assert request.status is RequestStatus.WAITING_FOR_KV
            if failed.settled:
                self.kv.free(request)
            else:
                self._quarantine(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
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
