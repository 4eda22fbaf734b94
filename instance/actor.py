"""What both role actors share: process setup, the metadata-store connection, their worker, abort, stats and
shutdown. `pdserve serve` wraps each role's subclass with `ray.remote`; the router calls it with the typed values
of instance/messages.py."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import ClassVar

from engine.config import EngineConfig
from instance.worker import InstanceStats, InstanceWorker
from kv_transfer import TransferConfig
from metastore import MetadataStore


class InstanceActor:
    worker_cls: ClassVar[type[InstanceWorker]]

    def __init__(self, instance_id: str, engine_config: EngineConfig, transfer: TransferConfig, redis_url: str,
                 namespace: str, registry_lease_s: float) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {instance_id} %(name)s: %(message)s")
        store = MetadataStore(redis_url, namespace, registry_lease_s)
        self.worker = self.worker_cls(instance_id, engine_config, transfer, store, address=instance_id)

    def ready(self) -> str:
        return self.worker.instance_id

    async def abort(self, request_id: str) -> None:
        await asyncio.wrap_future(self.worker.abort(request_id))

    def stats(self) -> InstanceStats:
        return self.worker.stats()

    def shutdown(self, drain_s: float = 0.0) -> None:
        self.worker.shutdown(drain_s)
