"""The prefill Ray actor: PrefillWorker behind an asyncio interface the router awaits."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from engine import EngineConfig, SamplingParams
from kv_transfer import TransferConfig
from metastore import MetadataStore
from prefill_worker.worker import PrefillResult, PrefillWorker


class PrefillActor:
    """Wrapped with `ray.remote` by the launcher. Every argument is plain data."""

    def __init__(self, instance_id: str, engine_kwargs: dict[str, Any], transfer_kwargs: dict[str, Any],
                 redis_url: str, namespace: str, lease_s: float) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {instance_id} %(name)s: %(message)s")
        store = MetadataStore(redis_url, namespace, lease_s)
        self.worker = PrefillWorker(instance_id, EngineConfig(**engine_kwargs), TransferConfig(**transfer_kwargs),
                                    store, address=instance_id)

    def ready(self) -> str:
        return self.worker.instance_id

    async def prefill(self, request_id: str, prompt: list[int], params: dict[str, Any]) -> dict[str, Any]:
        """Run the prompt to its first token. Returns {"first_token", "finish_reason", "cached_tokens",
        "kv_handle" (JSON, None if aborted)}; raises ValueError for bad input."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[PrefillResult] = loop.create_future()

        def sink(result: PrefillResult) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

        await asyncio.wrap_future(self.worker.prefill(request_id, prompt, SamplingParams(**params), sink))
        try:
            result = await done
        except asyncio.CancelledError:
            self.worker.abort(request_id)
            raise
        out = result.output
        return {"first_token": out.token_ids[0] if out.token_ids else None, "finish_reason": out.finish_reason,
                "cached_tokens": out.num_cached_tokens,
                "kv_handle": result.handle.to_json() if result.handle is not None else None}

    async def abort(self, request_id: str) -> None:
        await asyncio.wrap_future(self.worker.abort(request_id))

    def stats(self) -> dict[str, Any]:
        s = self.worker.engine.stats()
        return {"num_used_blocks": s.kv.num_used, "held": len(self.worker.engine.held),
                "counters": dict(self.worker.producer.counters)}

    def shutdown(self) -> None:
        self.worker.shutdown()
