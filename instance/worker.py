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
from typing import Any, ClassVar, Literal

from engine.config import EngineConfig
from engine.engine_stats import EngineStats
from engine.llm_engine import LLMEngine
from engine.metrics import MetricsSnapshot
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from instance.engine_loop import EngineLoop
from kv_transfer import NixlConnectorSpec, TransferConfig
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


class InstanceWorker:
    role: ClassVar[Literal["prefill", "decode"]]
    # NOTE: a holder must answer release messages while it has nothing to compute, so its loop steps the engine
    # (which polls the connector) when idle; a reader only needs that while it has reads in flight (work).
    poll_when_idle: ClassVar[bool]

    def __init__(self, instance_id: str, config: EngineConfig, transfer: TransferConfig | None = None,
                 store: MetadataStore | None = None, address: str = "") -> None:
        self.instance_id = instance_id
        spec = NixlConnectorSpec(instance_id, self.role, transfer or TransferConfig())
        self.engine = LLMEngine(config, kv_connector=spec)
        self.publisher = None if store is None else InstancePublisher.for_engine(
            store, instance_id, self.role, self.engine, address)
        self.loop = EngineLoop(self.engine.step, self.engine.has_unfinished_requests,
                               on_idle=self.engine.step if self.poll_when_idle else None,
                               periodic=self.publisher.tick if self.publisher else None,
                               after_step=self.publisher.publish_events if self.publisher else None,
                               name=f"{self.role}-{instance_id}").start()

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               sink: Callable[[RequestOutput], None], kv_source: Any | None = None,
               resumed: list[int] = ()) -> Future[int]:  # type: ignore[assignment]
        """Queue a request (LLMEngine.add_request); `sink` receives its outputs on the loop thread. The Future
        gives the number of KV blocks being loaded (ValueError for bad input, NoKVSpaceError when a load finds
        no room)."""
        return self.loop.add(
            request_id, lambda: self.engine.add_request(request_id, prompt, params, kv_source, resumed), sink)

    def abort(self, request_id: str) -> Future[None]:
        return self.loop.call(self.engine.abort_request, request_id)

    def stats(self, stream: dict[str, int] | None = None) -> InstanceStats:
        remote = self.engine.remote
        return InstanceStats(self.instance_id, self.role, self.engine.stats(), self.engine.metrics.snapshot(),
                             dict(remote.connector.counters) if remote else {}, stream or {})

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Stop. With `drain_s`, first wait up to that long for the requests in flight to finish and for held KV
        to be read by its decode instance (or its lease to expire); what is left then is logged."""
        deadline = time.monotonic() + drain_s
        while drain_s > 0:
            busy, held = self.loop.call(lambda: (self.engine.has_unfinished_requests(),
                                                 self.engine.stats().num_held)).result(10)
            if not busy and not held:
                break
            if time.monotonic() > deadline:
                log.warning("instance %s: drain timed out after %.0f s (requests in flight: %s, held KV: %d)",
                            self.instance_id, drain_s, busy, held)
                break
            time.sleep(0.05)
        self.loop.stop()
        if self.publisher is not None:
            self.publisher.close()
        self.engine.shutdown()
