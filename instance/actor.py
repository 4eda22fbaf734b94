"""What both role actors share: process setup, the metadata-store connection, their worker, abort, stats and
shutdown. `pdserve serve` wraps each role's subclass with `ray.remote`; the router calls it with the typed values
of instance/messages.py."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import ClassVar, Literal

from engine import envs
from engine.config import EngineConfig
from instance.worker import DrainReport, InstanceStats, InstanceWorker
from kv_transfer import TransferConfig
from metastore import MetadataStore


class InstanceActor:
    worker_cls: ClassVar[type[InstanceWorker]]

    def __init__(self, instance_id: str, engine_config: EngineConfig, transfer: TransferConfig, redis_url: str,
                 namespace: str, registry_lease_s: float, role: Literal["prefill", "decode"] | None = None) -> None:
        """`role`: for a role-switchable worker class (pdserve/serving_actor.py); a role's own class has one."""
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault(envs.PDSERVE_NODE_IP.name, _ray_node_ip())
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {instance_id} %(name)s: %(message)s")
        store = MetadataStore(redis_url, namespace, registry_lease_s)
        self.worker = self.worker_cls(instance_id, engine_config, transfer, store, address=instance_id, role=role)

    def ready(self) -> str:
        return self.worker.instance_id

    async def abort(self, request_id: str) -> None:
        await asyncio.wrap_future(self.worker.abort(request_id))

    def stats(self) -> InstanceStats:
        return self.worker.stats()

    def role(self) -> str:
        return self.worker.role

    async def drain(self, grace_s: float, timeout_s: float) -> DrainReport:
        """Leave the registry and wait for the work in flight (InstanceWorker.drain); the instance stays out of
        the registry until `rejoin`, `set_role` or shutdown. NOTE: off the actor's event loop: the streams in
        flight run on it."""
        return await asyncio.to_thread(self.worker.drain, grace_s, timeout_s)

    async def rejoin(self) -> None:
        await asyncio.to_thread(self.worker.rejoin)

    async def switch_role(self, role: Literal["prefill", "decode"]) -> None:
        """After `drain`: serve as `role` from now on and register again as it. On failure (not idle: a request
        came after the drain) the role is unchanged and the instance registers again in it."""
        if not hasattr(self, "prefill" if role == "prefill" else "generate"):
            raise ValueError(f"{type(self).__name__} cannot serve as {role}")
        try:
            await asyncio.to_thread(self.worker.switch_role, role)
        finally:
            await asyncio.to_thread(self.worker.rejoin)

    def shutdown(self, drain_s: float = 0.0) -> None:
        self.worker.shutdown(drain_s)


def _ray_node_ip() -> str:
    """This node's IP as Ray knows it (its `--node-ip-address`), "" outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return ""
    return str(ray.util.get_node_ip_address())
