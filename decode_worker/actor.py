"""The decode Ray actor: DecodeWorker behind an async streaming interface the router consumes."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from decode_worker.stream import OutputQueue, StepMailbox, next_outputs
from decode_worker.worker import DecodeWorker
from engine import EngineConfig, SamplingParams
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
        self._mailbox: StepMailbox | None = None  # made on the first call, on the actor's event loop
        self.stream_outputs = 0  # engine outputs streamed
        self.stream_items = 0  # stream items they went out in (fewer: a consumer lagged, outputs were merged)

    def ready(self) -> str:
        return self.worker.instance_id

    async def generate(self, request_id: str, prompt: list[int], params: dict[str, Any],
                       kv_handle: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Stream outputs as dicts: first {"transferred_blocks": n}, then {"token_ids", "text", "finished",
        "finish_reason", "cached_tokens"}: one per step while the consumer keeps up, else the tokens of every
        step since its last item, in order. Cancelling the stream aborts the request (blocks freed)."""
        if self._mailbox is None:
            self._mailbox = StepMailbox(asyncio.get_running_loop())
        outputs: OutputQueue = asyncio.Queue()
        kv = KVHandle.from_json(kv_handle) if kv_handle else None
        transferred = await asyncio.wrap_future(
            self.worker.generate(request_id, prompt, SamplingParams(**params), self._mailbox.sink(outputs), kv))
        finished = False
        try:
            yield {"transferred_blocks": transferred}
            text_sent = 0
            while not finished:
                out, token_ids, merged = await next_outputs(outputs)
                self.stream_outputs += merged
                self.stream_items += 1
                finished = out.finished
                yield {"token_ids": token_ids, "text": out.text[text_sent:], "finished": out.finished,
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
                "fallbacks": self.worker.consumer.counters["fallbacks"], "stream_outputs": self.stream_outputs,
                "stream_items": self.stream_items,
                "stream_wakeups": self._mailbox.wakeups if self._mailbox is not None else 0}

    def shutdown(self) -> None:
        self.worker.shutdown()
