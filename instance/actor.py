"""What both role actors share: process setup, the metadata-store connection, their worker, abort, stats and
shutdown. `pdserve serve` wraps each role's subclass with `ray.remote`; the router calls it with the typed values
of instance/messages.py."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import ClassVar, Literal

from engine import envs
from engine.config import EngineConfig
from instance.rank_actor import RayRankLauncher
from instance.worker import DrainReport, InstanceStats, InstanceWorker
from kv_transfer import TransferConfig
from kv_transfer.handle import KVEndpoint
from metastore import MetadataStore

log = logging.getLogger(__name__)

REDIS_WAIT_S = 2.0  # how long a dying TP group waits to count its restart in the metadata store


class InstanceActor:
    worker_cls: ClassVar[type[InstanceWorker]]

    def __init__(self, instance_id: str, engine_config: EngineConfig, transfer: TransferConfig, redis_url: str,
                 namespace: str, registry_lease_s: float, role: Literal["prefill", "decode"] | None = None) -> None:
        """`role`: for a role-switchable worker class (pdserve/serving_actor.py); a role's own class has one."""
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if not envs.PDSERVE_NODE_IP.get():  # NOTE: empty counts as unset (an inherited "" from a process outside Ray)
            os.environ[envs.PDSERVE_NODE_IP.name] = _ray_node_ip()
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {instance_id} %(name)s: %(message)s")
        self.instance_id = instance_id
        self.store = store = MetadataStore(redis_url, namespace, registry_lease_s)
        self._exiting = threading.Lock()
        launcher = None
        if engine_config.tensor_parallel_size > 1:
            # NOTE: ranks 1..N-1 are Ray actors in this actor's placement group (instance/rank_actor.py), which
            # the cluster made for this instance; a lost rank ends this process and Ray restarts the group.
            launcher = RayRankLauncher.in_current_group(instance_id, engine_config.tensor_parallel_size)
        self.worker = self.worker_cls(instance_id, engine_config, transfer, store, address=instance_id, role=role,
                                      rank_launcher=launcher,
                                      on_group_lost=self._exit_for_lost_group if launcher else None)

    def ready(self) -> str:
        return self.worker.instance_id

    async def abort(self, request_id: str) -> None:
        await asyncio.wrap_future(self.worker.abort(request_id))

    def stats(self) -> InstanceStats:
        return self.worker.stats()

    async def kv_endpoint(self) -> KVEndpoint:
        return await asyncio.wrap_future(self.worker.kv_endpoint())

    async def meet(self, peers: list[KVEndpoint]) -> int:
        """Instances of the other role this one may exchange KV with, introduced by a router before any request
        between them (router/introductions.py): how many were new here."""
        return await asyncio.wrap_future(self.worker.meet(peers))

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

    async def tp_ranks(self) -> list[int]:
        """The pid of every TP rank's process, in rank order (rank 0: this actor's). NOTE: awaited, not
        ray.get: this actor's event loop carries its streams."""
        ranks = self.worker.engine.executor.ranks
        pids = await asyncio.wait_for(asyncio.gather(*[r.actor.pid.remote() for r in ranks]), 30)  # type: ignore[attr-defined]
        return [os.getpid(), *pids]

    def shutdown(self, drain_s: float = 0.0) -> None:
        self.worker.shutdown(drain_s)

    def _exit_for_lost_group(self, why: str) -> None:
        """A rank of this instance's TP group is gone (or the engine failed under it): the group cannot serve.
        End this process without answering the calls in flight (the router retries or moves them, as for any
        lost instance: router/recovery.py); Ray restarts this actor, which starts fresh rank actors. Counted in
        the metadata store (the restarted instance reports it: `pdserve:tp_group_restarts`)."""
        if not self._exiting.acquire(blocking=False):
            return  # the other path got here first
        log.error("instance %s: %s; ending this process so that Ray restarts its whole TP group",
                  self.instance_id, why)
        counted: list[int] = []
        counter = threading.Thread(target=lambda: counted.append(self.store.count_tp_group_restart(
            self.instance_id)), daemon=True)
        counter.start()
        counter.join(REDIS_WAIT_S)  # NOTE: bounded: a Redis outage must not keep a broken group alive
        if counted:
            log.error("instance %s: TP group restart %d", self.instance_id, counted[0])
        else:
            log.error("instance %s: TP group restart not counted (metadata store unreachable within %g s)",
                      self.instance_id, REDIS_WAIT_S)
        logging.shutdown()
        os._exit(1)  # NOTE: not ray.actor.exit_actor(): an intentional exit would not be restarted


def _ray_node_ip() -> str:
    """This node's IP as Ray knows it (its `--node-ip-address`), "" outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return ""
    return str(ray.util.get_node_ip_address())
