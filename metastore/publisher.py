"""Keeps one engine instance's entry in the metadata store current: registration, heartbeats with its load,
and its KV events into the prefix-block index."""

from __future__ import annotations

import logging

from engine.block_pool import KVEvent
from engine.llm_engine import LLMEngine
from metastore.store import InstanceInfo, Load, MetadataStore

log = logging.getLogger(__name__)


class InstancePublisher:
    """Call `tick()` regularly (every lease/3 or more often) from the thread that owns the engine."""

    def __init__(self, store: MetadataStore, info: InstanceInfo, engine: LLMEngine) -> None:
        self.store, self.info, self.engine = store, info, engine
        self.reregistrations = 0

    def register(self) -> None:
        self.store.register(self.info)
        self.engine.take_kv_events()  # what the cache holds is republished in full below
        cached = tuple(self.engine.kv.pool.cached)
        if cached:
            self.store.apply_kv_events(self.info.instance_id, [KVEvent("stored", cached)])

    def load(self) -> Load:
        s = self.engine.stats()
        queued = sum(r.num_tokens - r.num_computed_tokens for r in self.engine.scheduler.waiting)
        return Load(waiting=s.num_waiting, running=s.num_running, kv_usage=s.kv_usage, queued_prefill_tokens=queued)

    def tick(self) -> None:
        if not self.store.heartbeat(self.info.instance_id, self.load()):
            # The lease lapsed (a long stall) or Redis restarted: come back with everything we hold.
            self.reregistrations += 1
            log.warning("instance %s was dropped from the registry; registering again", self.info.instance_id)
            self.register()
            return
        events = self.engine.take_kv_events()
        if events:
            self.store.apply_kv_events(self.info.instance_id, events)

    def close(self) -> None:
        self.store.deregister(self.info.instance_id)
