"""The router's in-memory view of the cluster: registry, loads, policy and the prefix-block index, kept current
from Redis by one background thread, so that a placement decision reads no Redis at all.

    thread "cluster-view":  every refresh_s: live instances, their loads, the policy   (3 pipelined reads)
                            every stats_refresh_s: their stats records (one MGET; exported as metrics) and
                                            the node records (one HGETALL; `pdserve status`)
                            in between:     XREAD BLOCK on every instance's KV event stream -> PrefixIndex

Redis stays the source of truth. An instance the view has not seen yet (a cold start, a new instance, another
router's restart) is read as a snapshot, its block set and the stream position it reflects, in one transaction;
from there its stream's entries apply in order. Each entry carries a sequence number: a gap (the stream was
trimmed past this reader, or re-created after the instance's registration lapsed) or a lost connection (Redis
restarted) makes the view read a fresh snapshot. Each such resync is counted (`index_resyncs`) and logged.

While Redis cannot be reached, decisions go on from the last state (the same instances, their last loads, the
last policy, the last index); the circuit breakers still drop instances that fail. Each failed refresh is
counted (`store_fallbacks`) and logged at WARNING at most once per 10 s; the thread retries with a backoff that
doubles from 0.25 s to 5 s. A Redis that comes back empty (restarted) holds only the instances that registered
again so far: for `recovery_s` after an outage, instances it lacks are kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import redis

from metastore.instance_stats import InstanceStatsRecord
from metastore.nodes import NodeRecord
from metastore.policy import PlacementPolicy
from metastore.store import InstanceInfo, Load, MetadataStore
from router.prefix_index import PrefixIndex
from router.wire import RateLimitedWarning

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.25, 5.0  # seconds without asking Redis after a failure
EVENT_BATCH = 1000  # stream entries read per instance per call
STATS_REFRESH_S = 1.0  # how often the instances' stats records are read (metrics and `pdserve status`)
HEARTBEAT_STALE_S = 2.5  # a stats record whose heartbeat_seq stood still this long: heartbeats are missing


@dataclass(frozen=True)
class ClusterState:
    """What placement reads; replaced whole (never mutated), so a decision sees one consistent state."""

    instances: tuple[InstanceInfo, ...] = ()  # live, in id order
    loads: dict[str, Load] = field(default_factory=dict)
    policy: PlacementPolicy = field(default_factory=PlacementPolicy)


class ClusterView:
    def __init__(self, store: MetadataStore, base_policy: PlacementPolicy, refresh_s: float = 0.2,
                 recovery_s: float = 5.0, stats_refresh_s: float = STATS_REFRESH_S) -> None:
        self.store, self.base_policy = store, base_policy
        self.refresh_s, self.recovery_s, self.stats_refresh_s = refresh_s, recovery_s, stats_refresh_s
        # The instances' last stats records (replaced whole) and, per instance, (heartbeat_seq, when it last
        # changed): read by the metrics collector and GetLoads, never by placement.
        self.instance_stats: dict[str, InstanceStatsRecord] = {}
        self.nodes: tuple[NodeRecord, ...] = ()  # the node watcher's records (metastore/nodes.py), for operators
        self._heartbeat_seen: dict[str, tuple[int, float]] = {}
        self.restarts: Counter[str] = Counter()  # instance -> re-registrations with a new pid seen here
        self._pids: dict[str, int] = {}
        self._next_stats = 0.0
        self.state = ClusterState(policy=base_policy)
        self.index = PrefixIndex()
        self.counters: Counter[str] = Counter()
        self._cursors: dict[str, tuple[str, int]] = {}  # instance -> (stream entry id, sequence) applied
        self._recovering_until = 0.0
        self._backoff = BACKOFF_MIN_S
        self._warn = RateLimitedWarning(log)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()  # set after the first complete refresh (registry and every index)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> ClusterView:
        """Read everything once (so the first decision has the index), then follow Redis on a thread. A Redis
        that cannot be reached now is logged; the thread keeps trying."""
        t0 = time.monotonic()
        if self._refresh_safely():
            log.info("cluster view: %d instances, %d indexed blocks, read in %.2f s", len(self.state.instances),
                     sum(self.index.num_blocks(i) for i in self.index.instances()), time.monotonic() - t0)
        self._thread = threading.Thread(target=self._run, name="cluster-view", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.store.close()

    # ---- the thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_refresh = time.monotonic() + self.refresh_s
        while not self._stop.is_set():
            wait_s = next_refresh - time.monotonic()
            if wait_s <= 0:
                next_refresh = time.monotonic() + self.refresh_s
                if not self._refresh_safely():
                    self._stop.wait(self._backoff)
                    self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
                continue
            try:
                self._follow_streams(max(1, int(wait_s * 1000)))
            except redis.RedisError as e:
                self._failed(e)
                self._stop.wait(self._backoff)
            except Exception:  # a bug here must not stop the view: log it, count it, go on
                self.counters["view_errors"] += 1
                log.exception("cluster view: applying KV events failed; resyncing the index")
                self._cursors.clear()
                self._stop.wait(1.0)

    def _refresh_safely(self) -> bool:
        try:
            self.refresh()
        except redis.RedisError as e:
            self._failed(e)
            return False
        except Exception:
            self.counters["view_errors"] += 1
            log.exception("cluster view: refresh failed")
            return False
        if self._backoff > BACKOFF_MIN_S:
            log.warning("metadata store reachable again")
        self._backoff = BACKOFF_MIN_S
        return True

    def _failed(self, e: Exception) -> None:
        self.counters["store_fallbacks"] += 1
        self._recovering_until = time.monotonic() + self._backoff + self.recovery_s
        # NOTE: a lost connection may be a restarted (emptied) Redis, where the streams start over: every
        # instance's index is read again as a snapshot once Redis answers.
        self._cursors.clear()
        self._warn.warn(f"metadata store unreachable ({e}); placing from the last state "
                        f"({len(self.state.instances)} instances)")

    # ---- one refresh: registry, loads, policy, and a snapshot for every instance not followed yet -----------
    def refresh(self) -> None:
        instances = self.store.live_instances()
        now = time.monotonic()
        previous = self.state.instances
        if not instances and previous and now >= self._recovering_until:
            self._recovering_until = now + self.recovery_s  # emptied: a restarted Redis (or the whole pool lost)
        if now < self._recovering_until:
            seen = {i.instance_id for i in instances}
            missing = [i for i in previous if i.instance_id not in seen]
            if missing:
                # NOTE: a Redis that just came back (restarted: empty) holds only the instances whose heartbeat
                # re-registered them so far; the others follow within a heartbeat period. Until then, keep the
                # ones that are missing: they were serving a moment ago (the breakers drop any that fail).
                self.counters["store_partial_fallbacks"] += 1
                self._warn.warn(f"metadata store lacks {len(missing)} instance(s) it had before the outage; "
                                "placing on them until they re-register")
                instances = sorted(instances + missing, key=lambda i: i.instance_id)
        ids = [i.instance_id for i in instances]
        loads = self.store.loads(ids)
        policy = self.store.policy(self.base_policy)
        registered = set(ids)
        for iid in [i for i in self.index.instances() if i not in registered]:
            self.index.drop(iid)  # left the registry: its blocks went with it
            self._cursors.pop(iid, None)
        for iid in ids:
            if iid not in self._cursors:
                self._resync(iid)
        self.state = ClusterState(tuple(instances), {**self.state.loads, **loads}, policy)
        self._track_pids(instances)
        if now >= self._next_stats:
            self._next_stats = now + self.stats_refresh_s
            self._read_stats(ids, now)
            self.nodes = self.store.nodes()
        self.synced.set()

    # ---- what operators see: restarts and stats records ------------------------------------------------------
    def _track_pids(self, instances: list[InstanceInfo]) -> None:
        for info in instances:
            old = self._pids.get(info.instance_id)
            if old is not None and old != info.pid:
                self.restarts[info.instance_id] += 1
                log.info("instance %s re-registered with a new pid (%d -> %d)", info.instance_id, old, info.pid)
            self._pids[info.instance_id] = info.pid

    def _read_stats(self, ids: list[str], now: float) -> None:
        stats = self.store.instance_stats(ids)
        seen = {}
        for iid, record in stats.items():
            last = self._heartbeat_seen.get(iid)
            seen[iid] = last if last is not None and last[0] == record.heartbeat_seq else (record.heartbeat_seq, now)
        self._heartbeat_seen, self.instance_stats = seen, stats

    def heartbeats_missing(self, instance_id: str) -> bool:
        """No stats record, or its heartbeat sequence stood still for HEARTBEAT_STALE_S (an instance kept through
        a Redis outage, or a stalled one whose lease has not lapsed yet)."""
        seen = self._heartbeat_seen.get(instance_id)
        return seen is None or time.monotonic() - seen[1] > HEARTBEAT_STALE_S

    def _resync(self, instance_id: str) -> None:
        snap = self.store.index_snapshot(instance_id)
        self.index.replace(instance_id, snap.block_keys)
        self._cursors[instance_id] = (snap.entry_id, snap.seq)

    # ---- KV events ------------------------------------------------------------------------------------------
    def _follow_streams(self, block_ms: int) -> None:
        if not self._cursors:
            self._stop.wait(block_ms / 1000)
            return
        events = self.store.read_index_events({iid: c[0] for iid, c in self._cursors.items()}, block_ms,
                                              EVENT_BATCH)
        for iid, entries in events.items():
            if iid not in self._cursors:
                continue
            _, seq = self._cursors[iid]
            for event in entries:
                if event.seq != seq + 1:  # trimmed past us, or a new stream: the snapshot is the truth
                    self.counters["index_resyncs"] += 1
                    log.warning("cluster view: KV events of %s jump from %d to %d; reading its blocks again", iid,
                                seq, event.seq)
                    self._resync(iid)
                    break
                if event.stored:
                    self.index.store(iid, event.block_keys)
                else:
                    self.index.remove(iid, event.block_keys)
                seq = event.seq
                self._cursors[iid] = (event.entry_id, seq)
            self.counters["index_events"] += len(entries)
