"""The decode role: continuously batches requests whose KV it pulled, and prefills short ones itself.

Thread model: one EngineLoop thread owns the engine, the KV consumer and the metadata-store publisher; every
public method may be called from any thread (it returns a Future).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

from engine.config import EngineConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer import KVConsumer, KVHandle, TransferConfig
from metastore import InstancePublisher, MetadataStore


class DecodeWorker:
    def __init__(self, instance_id: str, config: EngineConfig, transfer: TransferConfig | None = None,
                 store: MetadataStore | None = None, address: str = "") -> None:
        self.instance_id = instance_id
        self.engine = LLMEngine(config)
        self.consumer = KVConsumer(self.engine, instance_id, transfer)
        self.publisher = None if store is None else InstancePublisher.for_engine(
            store, instance_id, "decode", self.engine, self.consumer.agents, address)
        self.loop = EngineLoop(self.consumer.step, self.consumer.has_work,
                               periodic=self.publisher.tick if self.publisher else None,
                               after_step=self.publisher.publish_events if self.publisher else None,
                               name=f"decode-{instance_id}").start()

    def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                 sink: Callable[[RequestOutput], None], kv: KVHandle | None = None) -> Future[int]:
        """Queue a request: prefilled here when `kv` is None, else decoded over KV pulled from a prefill
        instance. The Future gives the number of blocks being transferred (ValueError for bad input); `sink`
        receives every output (on the loop thread)."""
        def submit() -> int:
            if kv is None:
                self.engine.add_request(request_id, prompt, params)
                return 0
            return self.consumer.add_remote_request(request_id, prompt, params, kv)

        return self.loop.add(request_id, submit, sink)

    def abort(self, request_id: str) -> Future[None]:
        return self.loop.call(self.consumer.abort, request_id)

    def shutdown(self) -> None:
        self.loop.stop()
        if self.publisher is not None:
            self.publisher.close()
        self.engine.shutdown()
