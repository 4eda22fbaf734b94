"""The decode role: continuously batches requests whose KV it pulled, and prefills the others itself."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from instance.worker import InstanceWorker
from kv_transfer import KVHandle
from kv_transfer.handle import StreamedKV


class DecodeWorker(InstanceWorker):
    role = "decode"
    poll_when_idle = False

    def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                 sink: Callable[[RequestOutput], None], kv: KVHandle | StreamedKV | None = None,
                 resumed: list[int] = ()) -> Future[int]:  # type: ignore[assignment]
        """Queue a request: prefilled here when `kv` is None, else decoded over KV pulled from a prefill
        instance (which may still be computing it: StreamedKV); `resumed` continues a stream that moved here
        (LLMEngine.add_request). The Future gives the number of blocks being transferred; `sink` receives every
        output."""
        return self.submit(request_id, prompt, params, sink, kv, resumed)
