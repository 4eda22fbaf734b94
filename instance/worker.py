"""One serving instance of a role: its engine (with the role's KV connector), the publisher that keeps its entry in
the metadata store current, and the loop thread that owns both.

Thread model: one EngineLoop thread owns the engine and the publisher; every public method may be called from
any thread (it returns a Future, or reads counters that are only ever incremented).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from engine.config import EngineConfig
from engine.engine_stats import EngineStats
from engine.llm_engine import LLMEngine
from engine.metrics import MetricsSnapshot
from engine.outputs import RequestOutput
from engine.rank_launcher import RankLauncher
from engine.sampling_params import SamplingParams
from instance.engine_loop import EngineLoop
from kv_transfer import NixlConnectorSpec, TransferConfig
from kv_transfer.agent import TransferAgent
from kv_transfer.handle import KVEndpoint, KVHandle, KVReader
from metastore import InstancePublisher, MetadataStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceStats:
    """What an instance's `stats()` reports (bench/actor_stats.py records it after every sweep)."""

    instance_id: str
    role: str
    engine: EngineStats
    metrics: MetricsSnapshot  # the engine's counters and step timings
    kv_connector: dict[str, int]  # the KV connector's counters (transfers, fallbacks, leases, ...)
    stream: dict[str, int]  # the decode actor's stream counters (empty for prefill)


@dataclass(frozen=True)
class DrainReport:
    """How a drain (InstanceWorker.drain) ended."""

    instance_id: str
    waited_s: float
    timed_out: bool  # True: what is below was still there at the deadline
    busy: bool = False  # requests in flight
    held: int = 0  # requests whose KV was held for a reader


class InstanceWorker:
    # The role's class sets both; a role-switchable worker (pdserve/serving_actor.py) passes `role` instead and
    # `switch_role` changes them. NOTE: a holder must answer release messages while it has nothing to compute,
    # so its loop steps the engine (which polls the connector) when idle; a reader only needs that while it
    # has reads in flight (work).
    role: Literal["prefill", "decode"]
    poll_when_idle: bool

    def __init__(self, instance_id: str, config: EngineConfig, transfer: TransferConfig | None = None,
                 store: MetadataStore | None = None, address: str = "",
                 role: Literal["prefill", "decode"] | None = None, rank_launcher: RankLauncher | None = None,
                 on_group_lost: Callable[[str], None] | None = None) -> None:
        """`rank_launcher`: who starts TP ranks 1..N-1 (None: spawned processes). `on_group_lost(why)`: called
        once when the TP group can no longer serve (a rank is gone, or the engine loop failed under it), instead
        of failing the calls in flight; the instance's Ray actor then ends its process (instance/actor.py)."""
        self.instance_id = instance_id
        if role is not None:
            self.role, self.poll_when_idle = role, role == "prefill"
        self.transfer = transfer or TransferConfig()
        self.engine: LLMEngine
        self.publisher: InstancePublisher | None = None
        self.role_switches = 0
        self._group_lost: Callable[[str], None] | None = None

        def build() -> None:
            self.engine = LLMEngine(config, kv_connector=NixlConnectorSpec(instance_id, self.role, self.transfer),
                                    rank_launcher=rank_launcher)
            if on_group_lost is not None and self.engine.executor.ranks:
                self.engine.executor.watch_ranks(lambda rank, how: on_group_lost(f"TP rank {rank} lost ({how})"))
                self._group_lost = on_group_lost
            if store is not None:
                self.publisher = InstancePublisher.for_engine(store, instance_id, self.role, self.engine, address)

        self.loop = EngineLoop(lambda: self.engine.step(), lambda: self.engine.has_unfinished_requests(),
                               on_idle=self._on_idle, periodic=self._tick, after_step=self._publish_events,
                               on_failure=self._loop_failed, name=f"{self.role}-{instance_id}")
        # NOTE: the engine is built (and warmed up) on the thread that will step it: PyTorch keeps cuDNN's attention
        # plans per thread, so a warm-up on this one left the loop thread to build each again on the first prompt
        # of each padded length: a fresh prefill instance's first step took 88-146 ms against 20-35 on an H200, and
        # 24-30 ms with this (docs/performance.md, "The engine warmed up on the thread that steps it")
        self.loop.start(setup=build)

    def _tick(self) -> None:
        if self.publisher is not None:
            self.publisher.tick()

    def _publish_events(self) -> None:
        if self.publisher is not None:
            self.publisher.publish_events()

    def _loop_failed(self, error: BaseException) -> None:
        if self._group_lost is not None:
            self._group_lost(f"engine loop failed ({error!r})")

    def _on_idle(self) -> None:
        if self.poll_when_idle:  # NOTE: read every time: a role switch changes it
            self.engine.step()

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               sink: Callable[[RequestOutput], None], kv_source: Any | None = None,
               resumed: list[int] = (), kv_reader: KVReader | None = None) -> Future[int]:  # type: ignore[assignment]
        """Queue a request (LLMEngine.add_request); `sink` receives its outputs on the loop thread. The Future
        gives the number of KV blocks being loaded (ValueError for bad input, NoKVSpaceError when a load finds
        no room)."""
        return self.loop.add(request_id, lambda: self.engine.add_request(request_id, prompt, params, kv_source,
                                                                         resumed, kv_reader), sink)

    def kv_source_ready(self, request_id: str, source: KVHandle) -> Future[None]:
        return self.loop.call(self.engine.kv_source_ready, request_id, source)

    def kv_source_lost(self, request_id: str) -> Future[None]:
        return self.loop.call(self.engine.kv_source_lost, request_id)

    def kv_endpoint(self) -> Future[KVEndpoint]:
        """This instance's agents and reader identity (the same in either role), read on the loop thread (the
        only one that uses the agent)."""
        def read() -> KVEndpoint:
            ranks = self.engine.kv_ranks
            agent = ranks.local
            assert isinstance(agent, TransferAgent)
            return KVEndpoint(self.instance_id, list(ranks.descriptors),
                              KVReader(agent.name, agent.partial_metadata_b64()))

        return self.loop.call(read)

    def meet(self, peers: list[KVEndpoint]) -> Future[int]:
        """Learn and connect to instances of the other role (LLMEngine.meet_kv_peers), on the loop thread, which
        owns the connector. NOTE: it takes that thread for a few ms a new peer: the time the first request
        between the two would otherwise have spent on it, on the same thread."""
        return self.loop.call(self.engine.meet_kv_peers, peers)

    def abort(self, request_id: str) -> Future[None]:
        return self.loop.call(self.engine.abort_request, request_id)

    def stats(self, stream: dict[str, int] | None = None) -> InstanceStats:
        remote = self.engine.remote
        return InstanceStats(self.instance_id, self.role, self.engine.stats(), self.engine.metrics.snapshot(),
                             dict(remote.connector.counters) if remote else {}, stream or {})

    def wait_idle(self, timeout_s: float, quiet_until: float = 0.0) -> DrainReport:
        """Wait until no request is in flight and no KV is held for a reader (read, or its lease expired), and
        not before `quiet_until` (monotonic); at most `timeout_s`. What is left then is logged."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while True:
            busy, held = self.loop.call(lambda: (self.engine.has_unfinished_requests(),
                                                 len(self.engine.remote.held) if self.engine.remote else 0)
                                        ).result(10)
            now = time.monotonic()
            if not busy and not held and now >= quiet_until:
                return DrainReport(self.instance_id, now - t0, False)
            if now > deadline:
                log.warning("instance %s: drain timed out after %.0f s (requests in flight: %s, held KV: %d)",
                            self.instance_id, timeout_s, busy, held)
                return DrainReport(self.instance_id, now - t0, True, busy, held)
            time.sleep(0.05)

    def drain(self, grace_s: float, timeout_s: float) -> DrainReport:
        """Leave the registry (routers stop placing here within their refresh), keep serving what was placed
        here before they saw it for at least `grace_s`, then wait (up to `timeout_s`) for the requests in flight
        and the held KV. The instance stays out of the registry until `rejoin` (or shutdown)."""
        if self.publisher is not None:
            self.loop.call(self.publisher.withdraw).result(30)
        report = self.wait_idle(timeout_s, time.monotonic() + grace_s)
        log.info("instance %s (%s) drained in %.1f s%s", self.instance_id, self.role, report.waited_s,
                 " (timed out)" if report.timed_out else "")
        return report

    def rejoin(self) -> None:
        """Back into the registry after a drain, in the current role."""
        if self.publisher is not None:
            self.loop.call(self.publisher.rejoin, self.role).result(30)

    def switch_role(self, role: Literal["prefill", "decode"]) -> None:
        """After a drain: swap the engine's KV connector for the role's (the weights, the KV cache and the rank
        parts stay), then register again with the new role. ValueError when the engine is not idle (a request
        arrived after the drain): nothing changed then."""

        def switch() -> None:
            self.engine.replace_kv_connector(NixlConnectorSpec(self.instance_id, role, self.transfer))
            old, self.role, self.poll_when_idle = self.role, role, role == "prefill"
            self.role_switches += 1
            log.info("instance %s switched role %s -> %s (role switches: %d)", self.instance_id, old, role,
                     self.role_switches)

        self.loop.call(switch).result(30)

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop. With `drain_s`, first wait up to that long for the requests in flight to finish and for held KV
        to be read by its decode instance (or its lease to expire); what is left then is logged."""
        if drain_s > 0:
            self.wait_idle(drain_s)
        self.loop.stop()
        if self.publisher is not None:
            self.publisher.close()
        self.engine.shutdown()
