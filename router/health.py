"""Per-instance circuit breakers: the router stops placing on an instance that failed, without waiting for its
registry lease to lapse.

    closed ──(died: at once; other failures: `threshold` in a row)──► open ──(cooldown_s)──► half-open
    half-open: one request probes it; success closes the breaker, failure opens it again.

A lost instance that comes back (Ray restarts the actor) registers again with a new pid: its breaker closes at
once, so the pool is whole again as soon as the restarted instance is up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from metastore.store import InstanceInfo

log = logging.getLogger(__name__)


@dataclass
class _Breaker:
    pid: int  # the process the failures were seen on
    failures: int = 0  # in a row
    open_until: float = 0.0  # while now < open_until: open; after it, half-open (0.0: closed)
    probe_since: float = 0.0  # half-open: when the one probe request was placed (0.0: none in flight)


class InstanceHealth:
    def __init__(self, threshold: int = 3, cooldown_s: float = 5.0) -> None:
        self.threshold, self.cooldown_s = threshold, cooldown_s
        self.counters: Counter[str] = Counter()  # opened, reopened, closed, probes
        self._breakers: dict[str, _Breaker] = {}
        self._lock = threading.Lock()  # NOTE: placement runs on worker threads

    def usable(self, info: InstanceInfo) -> bool:
        """May a request be placed on `info` now? (Call `placed` for the one chosen.)"""
        with self._lock:
            b = self._breakers.get(info.instance_id)
            if b is None or b.open_until == 0.0:
                return True
            if info.pid != b.pid:  # restarted: a new process registered under the same id
                del self._breakers[info.instance_id]
                self.counters["closed_restarted"] += 1
                log.info("instance %s is back (pid %d): its breaker is closed", info.instance_id, info.pid)
                return True
            now = time.monotonic()
            if now < b.open_until:
                return False
            return b.probe_since == 0.0 or now - b.probe_since > self.cooldown_s  # one probe at a time

    def usable_of(self, instances: list[InstanceInfo]) -> list[InstanceInfo]:
        """The instances that `usable` allows, in order. NOTE: all of them at once when no breaker is open
        (the common case): a decision over 64 instances must not take 64 locks."""
        if not self._breakers:
            return instances
        return [i for i in instances if self.usable(i)]

    def is_open(self, instance_id: str) -> bool:
        """Is the instance's breaker open or half-open (for operators: `pdserve status`, metrics)?"""
        b = self._breakers.get(instance_id)
        return b is not None and b.open_until != 0.0

    def placed(self, instance_id: str) -> None:
        with self._lock:
            b = self._breakers.get(instance_id)
            if b is not None and b.open_until and time.monotonic() >= b.open_until:
                b.probe_since = time.monotonic()
                self.counters["probes"] += 1

    def succeeded(self, instance_id: str) -> None:
        with self._lock:
            b = self._breakers.pop(instance_id, None)
            if b is not None and b.open_until:
                self.counters["closed"] += 1
                log.info("instance %s answered again: its breaker is closed", instance_id)

    def failed(self, instance_id: str, pid: int, dead: bool, why: str) -> None:
        """A call to the instance failed; `dead`: it is gone (actor died or unavailable): open at once."""
        with self._lock:
            b = self._breakers.get(instance_id)
            if b is None or b.pid != pid:
                b = self._breakers[instance_id] = _Breaker(pid)
            b.failures += 1
            half_open = b.open_until != 0.0
            if dead or half_open or b.failures >= self.threshold:
                b.open_until, b.probe_since = time.monotonic() + self.cooldown_s, 0.0
                self.counters["reopened" if half_open else "opened"] += 1
                log.warning("instance %s: breaker open for %.1f s after %d failure(s) (%s)", instance_id,
                            self.cooldown_s, b.failures, why)
