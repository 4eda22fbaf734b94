"""The decode Ray actor: DecodeWorker behind an async streaming interface the router consumes."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from decode_worker.worker import DecodeWorker
from engine import EngineConfig, RequestOutput, SamplingParams
from kv_transfer import KVHandle, TransferConfig
from metastore import MetadataStore


class DecodeActor:
    """Wrapped with `ray.remote` by the launcher. Every argument is plain data."""

    def __init__(self, instance_id: str, engine_kwargs: dict[str, Any], transfer_kwargs: dict[str, Any],
                 redis_url: str, namespace: str, lease_s: float) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {instance_id} %(name)s: %(message)s")
        store = MetadataStore(redis_url, namespace, lease_s)
        self.worker = DecodeWorker(instance_id, EngineConfig(**engine_kwargs), TransferConfig(**transfer_kwargs),
                                   store, address=instance_id)

    def ready(self) -> str:
        return self.worker.instance_id

    async def generate(self, request_id: str, prompt: list[int], params: dict[str, Any],
                       kv_handle: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Stream outputs as dicts: first {"transferred_blocks": n}, then {"token_ids", "text", "finished",
        "finish_reason", "cached_tokens"} per step. Cancelling the stream aborts the request (blocks freed)."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        kv = KVHandle.from_json(kv_handle) if kv_handle else None
        transferred = await asyncio.wrap_future(
            self.worker.generate(request_id, prompt, SamplingParams(**params), sink, kv))
        finished = False
        try:
            yield {"transferred_blocks": transferred}
            text_sent = 0
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield {"token_ids": out.new_token_ids, "text": out.text[text_sent:], "finished": out.finished,
                       "finish_reason": out.finish_reason, "cached_tokens": out.num_cached_tokens}
                text_sent = len(out.text)
        finally:
            if not finished:  # the consumer went away (cancel, deadline): free the request's blocks now
                self.worker.abort(request_id)

    async def abort(self, request_id: str) -> None:
        await asyncio.wrap_future(self.worker.abort(request_id))

    def stats(self) -> dict[str, Any]:
        s = self.worker.engine.stats()
        return {"num_used_blocks": s.kv.num_used, "running": s.num_running, "waiting": s.num_waiting,
                "fallbacks": self.worker.consumer.counters["fallbacks"]}

    def shutdown(self) -> None:
        self.worker.shutdown()
