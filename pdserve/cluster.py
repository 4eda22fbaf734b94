"""What `pdserve serve` starts and owns, whatever the number of routers: Redis (private unless configured), Ray
(configured, RAY_ADDRESS, or local) and the prefill and decode pools as named Ray actors; and the cluster file
that lets `pdserve router` attach to them (pdserve/runtime.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from engine import envs
from instance.rank_actor import BUNDLE_CPU
from metastore import MetadataStore, RedisServer
from pdserve.config import ServingConfig
from pdserve.runtime import ClusterInfo, ray_namespace, remove_cluster_file, write_cluster_file
from pdserve.tp_groups import create_group, remove_group

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 5.0  # NOTE: a Redis call that hangs (a stopped server) must not hang the router's view thread


class Cluster:
    """Everything `pdserve serve` starts, in start order; `stop()` undoes it in reverse."""

    def __init__(self, cfg: ServingConfig) -> None:
        self.cfg = cfg
        self.redis: RedisServer | None = None
        self.ray_started = False
        self.actors: dict[str, Any] = {}  # instance id (its actor's name) -> actor handle
        self.groups: dict[str, Any] = {}  # instance id -> its placement group (tensor_parallel_size > 1 only)
        self.roles: dict[str, str] = {}  # instance id -> the role it serves now (a role switch changes it)
        self.resources: dict[str, dict[str, float]] = {}  # instance id -> its actor's custom resources
        # instances whose node was lost and whose actor Ray cannot place again (pdserve/node_watcher.py)
        self.unplaced: frozenset[str] = frozenset()
        self.ray_namespace = ray_namespace(cfg)
        self.cluster_file_written = False

    def start_infra(self) -> MetadataStore:
        """Redis and Ray. NOTE: call before any gRPC thread exists: both fork processes, and a child forked
        while gRPC's threads run can hang before exec (seen here: Ray's GCS never wrote its port file)."""
        import ray

        cfg = self.cfg
        url = cfg.metastore.redis_url
        if url is None:
            self.redis = RedisServer().start()
            url = self.redis.url
        self.redis_url = url
        # NOTE: "local" starts a private Ray; a bare ray.init() would attach to any cluster already running on
        # this machine (e.g. one a `ray start` left behind).
        address = cfg.ray.address or envs.RAY_ADDRESS.get() or "local"
        if not ray.is_initialized():
            ray.init(address=address, namespace=self.ray_namespace, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            self.ray_started = True
        # NOTE: the GCS address, not `address` ("local" or "auto" mean nothing to another process)
        gcs = ray.get_runtime_context().gcs_address
        path = write_cluster_file(cfg, ClusterInfo(url, gcs, self.ray_namespace, os.getpid()))
        self.cluster_file_written = True
        log.info("cluster file %s: redis %s, ray %s, namespace %s", path, url, gcs, self.ray_namespace)
        return MetadataStore(url, cfg.metastore.namespace, cfg.metastore.registry_lease_s,
                             socket_timeout=STORE_TIMEOUT_S)

    def start_pools(self) -> None:
        """The prefill and decode actors; returns once every instance is ready (registered in the store)."""
        cfg = self.cfg
        for role in ("prefill", "decode"):
            for i in range(getattr(cfg.pools, role).replicas):
                self._create(f"{role}-{i}", role)
        import ray

        ray.get([a.ready.remote() for a in self.actors.values()])

    def _create(self, iid: str, role: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from pdserve.serving_actor import ServingActor

        cfg, url = self.cfg, self.redis_url
        pool = getattr(cfg.pools, role)
        engine_config, tp = cfg.pool_engine(role), pool.tensor_parallel_size
        device = cfg.engine.device  # NOTE: "auto" is resolved by each engine on its own node; here, by the cluster
        gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        # NOTE: one actor per instance, of the one class that serves either role (a role switch keeps it).
        # At tensor_parallel_size > 1 it is rank 0 of a TP group: bundle 0 of the instance's placement group
        # (pdserve/tp_groups.py), whose other bundles hold the rank actors it starts (instance/rank_actor.py).
        # NOTE: a lost instance comes back: Ray restarts its actor (the same arguments: it registers again
        # and the router's breaker for it closes on the new pid). Calls in flight when it died fail;
        # the router retries or moves them (router/recovery.py), so Ray must not retry them itself.
        resources = pool.actor_resources()
        options: dict[str, Any] = dict(num_cpus=0, num_gpus=pool.gpus_per_instance if gpu else 0,
                                       resources=resources)
        if tp > 1:
            pg = self.groups[iid] = create_group(iid, tp, gpu, resources)
            options.update(num_cpus=0 if gpu else BUNDLE_CPU,  # NOTE: exactly bundle 0
                           scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0))
        actor_cls = ray.remote(ServingActor).options(name=iid, namespace=self.ray_namespace, max_concurrency=1000,
                                                     max_restarts=-1, max_task_retries=0, **options)
        actor = actor_cls.remote(iid, engine_config, cfg.kv_transfer, url, cfg.metastore.namespace,
                                 cfg.metastore.registry_lease_s, role)
        self.actors[iid], self.roles[iid], self.resources[iid] = actor, role, resources
        return actor

    def remove(self, iid: str) -> None:
        """Kill the instance's actor for good (with its TP ranks) and give its placement group back."""
        import ray

        actor = self.actors.pop(iid)
        self.roles.pop(iid, None)
        self.resources.pop(iid, None)
        ray.kill(actor, no_restart=True)  # NOTE: the actors restart forever otherwise (max_restarts=-1)
        if (pg := self.groups.pop(iid, None)) is not None:
            remove_group(iid, pg)

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop everything; with `drain_s`, each instance first drains (InstanceWorker.shutdown): decode instances
        before prefill instances, so a prefill instance's held KV is read or expires before it goes."""
        import ray

        for iid in sorted(self.actors, key=lambda i: self.roles[i] == "prefill"):  # decode first
            actor = self.actors[iid]
            if iid in self.unplaced:  # NOTE: its node is lost and no other node fits it: nothing to drain
                log.warning("instance %s: its node was lost and it was never placed again; killing its actor", iid)
                ray.kill(actor)
                continue
            try:
                ray.get(actor.shutdown.remote(drain_s), timeout=drain_s + 30)
            except Exception as e:
                log.warning("actor shutdown failed: %s", e)
            self.remove(iid)
        if self.cluster_file_written:
            remove_cluster_file(self.cfg, os.getpid())
            self.cluster_file_written = False
        if self.ray_started:
            ray.shutdown()
            self.ray_started = False
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


REDIS_CHECK_S = 0.5


def start_infra(cfg: ServingConfig) -> tuple[Cluster, MetadataStore]:
    """Redis and Ray for `pdserve serve`, in-process router or controller alike; nothing is left running if
    either fails to start."""
    cluster = Cluster(cfg)
    try:
        return cluster, cluster.start_infra()
    except BaseException:
        cluster.stop()
        raise


def stop_on_signals(stop: asyncio.Event | None) -> asyncio.Event:
    """`stop` when the caller owns shutdown, else a new event that SIGINT and SIGTERM set. NOTE: call it after
    ray.init, which installs its own SIGTERM handler in the main thread (it would exit at once)."""
    if stop is not None:
        return stop
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def supervise_redis(server: RedisServer) -> None:
    """Restart the private redis-server whenever it dies (checked every REDIS_CHECK_S). NOTE: on the event loop's
    thread, not a worker thread: the restarted process's parent-death signal follows the thread that forked it."""
    while True:
        await asyncio.sleep(REDIS_CHECK_S)
        try:
            server.restart_if_dead()
        except RuntimeError as e:
            log.error("could not restart the private redis-server (%s); trying again", e)
