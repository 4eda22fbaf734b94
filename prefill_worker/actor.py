"""The prefill Ray actor: PrefillWorker behind an asyncio interface the router awaits."""

from __future__ import annotations

import asyncio

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from instance.actor import InstanceActor
from instance.messages import PrefillDone
from kv_transfer.handle import KVReader
from prefill_worker.worker import PrefillWorker


class PrefillActor(InstanceActor):
    worker_cls = PrefillWorker
    worker: PrefillWorker

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                      reader: KVReader | None = None) -> PrefillDone:
        """Run the prompt to its first token, streaming its KV progress to `reader` if given; raises ValueError
        for bad input. Cancelling aborts it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[RequestOutput] = loop.create_future()

        def sink(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(out))

        await asyncio.wrap_future(self.worker.prefill(request_id, prompt, params, sink, reader))
        try:
            out = await done
        except asyncio.CancelledError:
            self.worker.abort(request_id)
            raise
        return PrefillDone(out.kv_handoff, out.new_logprobs[0] if out.new_logprobs else None)
