"""The router's view of the metadata store, which keeps serving through a Redis outage.

Every successful read refreshes a snapshot (live instances, their loads, the policy). While Redis cannot be
reached, placement uses that snapshot: the same instances (the circuit breakers still drop any that fail), their
last loads, the last policy, and no prefix-cache overlap (affinity degrades; nothing fails). A Redis that comes
back empty (restarted) holds only the instances that re-registered so far: for `recovery_s` after an outage the
snapshot's missing instances are still used. Each fallback is
counted (`counters["store_fallbacks"]`) and logged at WARNING at most once per 10 s. After a failure Redis is
not asked again for a backoff that doubles from 0.25 s up to 5 s, then reset by the next success.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import redis

from metastore.policy import PlacementPolicy
from metastore.store import InstanceInfo, Load, MetadataStore
from router.wire import RateLimitedWarning

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.25, 5.0  # seconds without asking Redis after a failure


class StoreView:
    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self.counters: Counter[str] = Counter()
        self._instances: list[InstanceInfo] = []
        self.recovery_s = 5.0  # after an outage, how long instances missing from the registry are still used
        self._recovering_until = 0.0
        self._loads: dict[str, Load] = {}
        self._policy: PlacementPolicy | None = None
        self._lock = threading.Lock()  # NOTE: placement reads on worker threads
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN_S
        self._warn = RateLimitedWarning(log)

    def _read(self, what: str, call: Callable[[], T], fallback: Callable[[], T]) -> T:
        with self._lock:
            skip = time.monotonic() < self._retry_at
        if not skip:
            try:
                value = call()
                with self._lock:
                    if self._backoff > BACKOFF_MIN_S:
                        log.warning("metadata store reachable again")
                    self._backoff, self._retry_at = BACKOFF_MIN_S, 0.0
                return value
            except redis.RedisError as e:
                with self._lock:
                    self._recovering_until = time.monotonic() + self._backoff + self.recovery_s
                    self._retry_at = time.monotonic() + self._backoff
                    self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
                self._warn.warn(f"metadata store unreachable ({e}); placing from the last snapshot "
                                f"({len(self._instances)} instances, no prefix affinity)")
        self.counters["store_fallbacks"] += 1
        self.counters[f"store_fallbacks_{what}"] += 1
        return fallback()

    def live_instances(self) -> list[InstanceInfo]:
        def call() -> list[InstanceInfo]:
            instances = self.store.live_instances()
            now = time.monotonic()
            if not instances and self._instances and now >= self._recovering_until:
                self._recovering_until = now + self.recovery_s  # emptied: a restarted Redis (or the whole pool lost)
            if now < self._recovering_until:
                # NOTE: a Redis that just came back (restarted: empty) holds only the instances whose heartbeat
                # re-registered them so far; the others follow within a heartbeat period. Until then, keep the
                # snapshot's instances that are missing: they were serving a moment ago (the breakers still drop
                # any that fail).
                seen = {i.instance_id for i in instances}
                missing = [i for i in self._instances if i.instance_id not in seen]
                if missing:
                    self.counters["store_partial_fallbacks"] += 1
                    self._warn.warn(f"metadata store lacks {len(missing)} instance(s) it had before the outage; "
                                    "placing on them until they re-register")
                    return sorted(instances + missing, key=lambda i: i.instance_id)
            if instances:
                self._instances = instances
            return instances

        return self._read("instances", call, lambda: list(self._instances))

    def prefix_overlap(self, block_hashes: list[int]) -> dict[str, int]:
        return self._read("overlap", lambda: self.store.prefix_overlap(block_hashes), dict)

    def loads(self, instance_ids: list[str]) -> dict[str, Load]:
        def call() -> dict[str, Load]:
            loads = self.store.loads(instance_ids)
            self._loads.update(loads)
            return loads

        return self._read("loads", call, lambda: {i: self._loads.get(i, Load()) for i in instance_ids})

    def policy(self, base: PlacementPolicy) -> PlacementPolicy:
        def call() -> PlacementPolicy:
            self._policy = self.store.policy(base)
            return self._policy

        return self._read("policy", call, lambda: self._policy or base)
