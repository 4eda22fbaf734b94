"""Keeps one engine instance's entry in the metadata store current: registration, heartbeats with its load,
and its KV events into the prefix-block index."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import redis

from engine.block_pool import KVEvent
from engine.llm_engine import LLMEngine
from metastore.store import InstanceInfo, Load, MetadataStore

log = logging.getLogger(__name__)


class InstancePublisher:
    """Call `tick()` regularly (every lease/3 or more often) from the thread that owns the engine."""

    def __init__(self, store: MetadataStore, info: InstanceInfo, engine: LLMEngine) -> None:
        self.store, self.info, self.engine = store, info, engine
        self.reregistrations = 0
        self.failures = 0  # heartbeats that could not reach Redis (the lease then lapses: visible to the router)

    @classmethod
    def for_engine(cls, store: MetadataStore, instance_id: str, role: str, engine: LLMEngine,
                   kv_agents: list[dict[str, Any]], address: str = "") -> InstancePublisher:
        """Describe `engine` as an instance of `role` and register it."""
        config = engine.config
        info = InstanceInfo(instance_id=instance_id, role=role, address=address or instance_id,
                            tp_size=config.tensor_parallel_size, block_size=config.block_size,
                            num_blocks=engine.executor.runner.layout.num_blocks, max_num_seqs=config.max_num_seqs,
                            kv_agents=kv_agents, model=config.hash_salt, host=socket.gethostname(), pid=os.getpid())
        publisher = cls(store, info, engine)
        publisher.register()
        return publisher

    def register(self) -> None:
        self.store.register(self.info)
        self.engine.take_kv_events()  # what the cache holds is republished in full below
        cached = tuple(self.engine.kv.pool.cached)
        if cached:
            self.store.apply_kv_events(self.info.instance_id, [KVEvent("stored", cached)])

    def load(self) -> Load:
        # NOTE: not engine.stats(): that walks the whole free queue, and a heartbeat needs only O(1) numbers.
        sched = self.engine.scheduler
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        return Load(waiting=len(sched.waiting), running=len(sched.running), kv_usage=self.engine.kv.usage,
                    queued_prefill_tokens=queued)

    def tick(self) -> None:
        """Heartbeat with the load, then publish KV events. A Redis outage is logged and counted, never raised:
        the engine keeps serving what it has, and the registry drops it if the outage outlasts the lease."""
        try:
            self._tick()
        except redis.RedisError as e:
            self.failures += 1
            log.warning("instance %s: metadata store unreachable (%s); heartbeat %d failed", self.info.instance_id,
                        e, self.failures)

    def _tick(self) -> None:
        if not self.store.heartbeat(self.info.instance_id, self.load()):
            # The lease lapsed (a long stall) or Redis restarted: come back with everything we hold.
            self.reregistrations += 1
            log.warning("instance %s was dropped from the registry; registering again", self.info.instance_id)
            self.register()
            return
        self._publish_events()

    def publish_events(self) -> None:
        """Push pending KV events now (after each engine step), so placement sees new blocks at once."""
        try:
            self._publish_events()
        except redis.RedisError as e:
            self.failures += 1
            log.warning("instance %s: could not publish KV events (%s)", self.info.instance_id, e)

    def _publish_events(self) -> None:
        events = self.engine.take_kv_events()
        if events:
            self.store.apply_kv_events(self.info.instance_id, events)

    def close(self) -> None:
        try:
            self.store.deregister(self.info.instance_id)
        except redis.RedisError as e:
            log.warning("instance %s: could not deregister (%s); its lease will lapse", self.info.instance_id, e)
