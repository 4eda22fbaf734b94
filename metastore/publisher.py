"""Keeps one engine instance's entry in the metadata store current: registration, heartbeats with its load,
and its KV events into the prefix-block index."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading

import redis

from engine import envs
from engine.block_pool import KVEvent
from engine.llm_engine import LLMEngine
from metastore.instance_stats import InstanceStatsRecord
from metastore.store import InstanceInfo, Load, MetadataStore

log = logging.getLogger(__name__)


class KVEventSender:
    """Applies one instance's KV events to the prefix-block index on its own thread, in the order they were
    put. `put` never blocks; events queued while a Redis call is under way go out together in the next call.

    NOTE: the index update is a Redis round trip after every step that stored or evicted blocks; on the engine
    loop thread it took ~9% of a loaded decode actor's samples (docs/performance.md). The index is a placement
    hint, so a few milliseconds of lag cost nothing; the order of events, which decides what the index says,
    is kept. A failed call is logged and counted (`failures`); its events are lost, as a heartbeat's would be.
    """

    def __init__(self, store: MetadataStore, instance_id: str) -> None:
        self.store, self.instance_id = store, instance_id
        self.calls = 0  # apply_kv_events calls made
        self.puts = 0  # batches put (calls < puts: batches were coalesced under load)
        self.failures = 0
        self._queue: queue.SimpleQueue[list[KVEvent] | None] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._outstanding = 0  # put and not yet applied (or failed)
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{instance_id}", daemon=True)
        self._thread.start()

    def put(self, events: list[KVEvent]) -> None:
        with self._done:
            self._outstanding += 1
            self.puts += 1
        self._queue.put(events)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything put so far is applied (or has failed). False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Apply what is queued, then stop the thread."""
        with self._done:
            self._outstanding += 1
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            events = [e for b in batch if b is not None for e in b]
            failed = False
            if events:
                try:
                    self.store.apply_kv_events(self.instance_id, events)
                except redis.RedisError as e:
                    failed = True
                    log.warning("instance %s: could not publish %d KV events (%s)", self.instance_id, len(events),
                                e)
            with self._done:
                self.calls += bool(events)
                self.failures += failed
                self._outstanding -= len(batch)
                self._done.notify_all()


class InstancePublisher:
    """Call `tick()` regularly (every lease/3 or more often), and `publish_events()` after steps, from the
    thread that owns the engine. KV events reach Redis through a KVEventSender thread."""

    def __init__(self, store: MetadataStore, info: InstanceInfo, engine: LLMEngine) -> None:
        self.store, self.info, self.engine = store, info, engine
        self.reregistrations = 0
        # NOTE: while withdrawn (an instance draining for removal or a role switch) it is out of the registry on
        # purpose: heartbeats, which would re-register it, and KV events stop until `rejoin`.
        self.withdrawn = False
        self.failures = 0  # heartbeats that could not reach Redis (the lease then lapses: visible to the router)
        self.heartbeats = 0  # heartbeats attempted: the stats record's heartbeat_seq
        self.sender = KVEventSender(store, info.instance_id)
        # NOTE: read once: only a lost rank changes it, and that ends this process (instance/actor.py)
        self.tp_group_restarts = store.tp_group_restarts(info.instance_id) if info.tp_size > 1 else 0

    @classmethod
    def for_engine(cls, store: MetadataStore, instance_id: str, role: str, engine: LLMEngine,
                   address: str = "") -> InstancePublisher:
        """Describe `engine` as an instance of `role` and register it."""
        config = engine.config
        info = InstanceInfo(instance_id=instance_id, role=role, address=address or instance_id,
                            tp_size=config.tensor_parallel_size, block_size=config.block_size,
                            num_blocks=engine.num_kv_blocks, max_num_seqs=config.max_num_seqs,
                            model=config.hash_salt, host=socket.gethostname(), pid=os.getpid(),
                            node_ip=envs.PDSERVE_NODE_IP.get())
        publisher = cls(store, info, engine)
        publisher.register()
        return publisher

    def register(self) -> None:
        # NOTE: queued events first: one applied after the full snapshot below could re-add an evicted block.
        if not self.sender.flush():
            self.failures += 1
            log.warning("instance %s: KV events still queued after 10 s; registering anyway", self.info.instance_id)
        self.store.register(self.info)
        self.engine.take_kv_events()  # what the cache holds is republished in full below
        cached = self.engine.cached_block_hashes()
        if cached:
            self.store.apply_kv_events(self.info.instance_id, [KVEvent("stored", cached)])

    def load(self) -> Load:
        # NOTE: not engine.stats(): that walks the whole free queue, and a heartbeat needs only O(1) numbers.
        load = self.engine.load()
        return Load(waiting=load.waiting, running=load.running, kv_usage=load.kv_usage,
                    queued_prefill_tokens=load.queued_prefill_tokens)

    def stats_record(self, load: Load) -> InstanceStatsRecord:
        """The counters the router exports for this instance. O(1): the engine's running totals and its KV
        connector's counters (a dict of a few keys), read on the thread that owns both."""
        c = self.engine.counters()
        remote = self.engine.remote
        kv: dict[str, int] = remote.connector.counters if remote is not None else {}
        return InstanceStatsRecord(
            heartbeat_seq=self.heartbeats, waiting=load.waiting, running=load.running,
            kv_blocks_used=c.kv_blocks_used, kv_blocks_total=c.kv_blocks_total,
            prefix_cache_queries=c.prefix_cache_queries, prefix_cache_hits=c.prefix_cache_hits,
            preemptions=c.preemptions, steps=c.steps, step_seconds=c.step_s,
            kv_transfer_bytes=kv.get("bytes_transferred", 0), kv_transfer_seconds=kv.get("transfer_us", 0) / 1e6,
            kv_transfers=kv.get("transfers", 0), kv_transfer_failures=kv.get("fallbacks", 0),
            kv_local_fallbacks=c.kv_load_fallbacks, kv_lease_expiries=kv.get("lease_expired", 0),
            kv_loads_queued=c.kv_loads_queued, kv_loads_waiting=c.kv_loads_waiting,
            kv_lost_before_request=c.kv_lost_before_request,
            kv_streamed_loads=kv.get("streamed", 0), kv_stream_tail_seconds=kv.get("stream_tail_us", 0) / 1e6,
            kv_local_copy_bytes=kv.get("local_copy_bytes", 0),
            kv_local_copy_fallbacks=kv.get("local_copy_fallbacks", 0),
            kv_ack_wait_seconds=kv.get("ack_wait_us", 0) / 1e6, kv_streams=kv.get("streams", 0),
            kv_stream_messages_sent=kv.get("stream_messages_sent", 0),
            kv_stream_send_failures=kv.get("stream_send_failures", 0),
            kv_peers_met=kv.get("peers_met", 0), kv_meet_failures=kv.get("meet_failures", 0),
            computed_tokens=c.work.tokens, compute_seconds=c.work.seconds, work_steps=c.work.steps,
            work_prefill_tokens=c.work.prefill_tokens, work_prefill_pairs=c.work.prefill_pairs,
            work_decode_seqs=c.work.decode_seqs, work_decode_context=c.work.decode_context,
            work_cycles=c.work.cycles, work_cycle_step_seconds=c.work.cycle_step_seconds,
            work_cycle_seconds=c.work.cycle_seconds,
            requests_finished=c.requests_finished, prompt_tokens_finished=c.prompt_tokens_finished,
            output_tokens_finished=c.output_tokens_finished,
            tp_group_restarts=self.tp_group_restarts)

    def withdraw(self) -> None:
        """Leave the registry and stay out (no heartbeat, no KV event) until `rejoin`: routers stop placing here
        within their next refresh. Raises redis.RedisError when Redis cannot be reached (the caller decides)."""
        self.withdrawn = True
        self.engine.take_kv_events()  # NOTE: not published: `rejoin` republishes the whole cache
        if not self.sender.flush():
            log.warning("instance %s: KV events still queued after 10 s; withdrawing anyway", self.info.instance_id)
        self.store.deregister(self.info.instance_id)
        log.info("instance %s (%s) withdrew from the registry", self.info.instance_id, self.info.role)

    def rejoin(self, role: str | None = None) -> None:
        """Register again (as `role` when given) with everything the prefix cache holds, and resume heartbeats."""
        if role is not None:
            self.info = dataclasses.replace(self.info, role=role)
        self.register()
        self.withdrawn = False
        log.info("instance %s registered again as %s", self.info.instance_id, self.info.role)

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
        if self.withdrawn:
            return
        self.heartbeats += 1
        load = self.load()
        if not self.store.heartbeat(self.info.instance_id, load, self.stats_record(load)):
            # The lease lapsed (a long stall) or Redis restarted: come back with everything we hold.
            self.reregistrations += 1
            log.warning("instance %s was dropped from the registry; registering again", self.info.instance_id)
            self.register()
            return
        self.publish_events()

    def publish_events(self) -> None:
        """Hand pending KV events to the sender now (after each engine step), so placement sees new blocks
        within a Redis round trip. Never blocks."""
        events = self.engine.take_kv_events()
        if events and not self.withdrawn:
            self.sender.put(events)

    def close(self) -> None:
        self.sender.close()
        if self.withdrawn:
            return  # out of the registry already
        try:
            self.store.deregister(self.info.instance_id)
        except redis.RedisError as e:
            log.warning("instance %s: could not deregister (%s); its lease will lapse", self.info.instance_id, e)
