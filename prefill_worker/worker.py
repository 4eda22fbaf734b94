"""The prefill role: runs prompts to their first token and holds their KV for a decode instance to pull.

Thread model: one EngineLoop thread owns the engine, the KV producer and the metadata-store publisher; every
public method may be called from any thread (it returns a Future).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer import KVHandle, KVProducer, TransferConfig
from metastore import InstancePublisher, MetadataStore


@dataclass
class PrefillResult:
    """What a prefill hands back: the first token's output and, unless aborted, where the KV is."""

    request_id: str
    output: RequestOutput
    handle: KVHandle | None
    finished: bool = True


class PrefillWorker:
    def __init__(self, instance_id: str, config: EngineConfig, transfer: TransferConfig | None = None,
                 store: MetadataStore | None = None, address: str = "") -> None:
        self.instance_id = instance_id
        self.engine = LLMEngine(config)
        self.producer = KVProducer(self.engine, instance_id, transfer)
        self.publisher = None if store is None else InstancePublisher.for_engine(
            store, instance_id, "prefill", self.engine, self.producer.agents, address)
        self.loop = EngineLoop(self._step, self.engine.has_unfinished_requests, on_idle=self.producer.poll,
                               periodic=self.publisher.tick if self.publisher else None,
                               after_step=self.publisher.publish_events if self.publisher else None,
                               name=f"prefill-{instance_id}").start()

    def _step(self) -> list[PrefillResult]:
        return [PrefillResult(out.request_id, out, handle) for out, handle in self.producer.step()]

    def prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                sink: Callable[[PrefillResult], None]) -> Future[None]:
        """Queue a prompt; `sink` receives its PrefillResult (on the loop thread). ValueError via the Future."""
        return self.loop.add(request_id, lambda: self.producer.add_request(request_id, prompt, params), sink)

    def abort(self, request_id: str) -> Future[None]:
        return self.loop.call(self.producer.abort, request_id)

    def shutdown(self) -> None:
        self.loop.stop()
        if self.publisher is not None:
            self.publisher.close()
        self.engine.shutdown()
