"""`pdserve serve`: Redis (private unless configured), Ray (configured, RAY_ADDRESS, or local), the prefill and
decode pools as Ray actors, and the gRPC router. Prints exactly one line to stdout once healthy and shuts down
everything it started on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from api.v1 import pdserve_pb2_grpc
from engine import envs
from engine.model_info import ModelInfo
from engine.tokenizer import load_tokenizer
from metastore import MetadataStore, RedisServer
from pdserve.config import ServingConfig
from router.wire import SERVICE, add_router_to_server

log = logging.getLogger(__name__)



class Cluster:
    """Everything `pdserve serve` starts, in start order; `stop()` undoes it in reverse."""

    def __init__(self, cfg: ServingConfig) -> None:
        self.cfg = cfg
        self.redis: RedisServer | None = None
        self.ray_started = False
        self.actors: list[Any] = []
        self.ray_namespace = f"pdserve-{cfg.metastore.namespace}"

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
        return MetadataStore(url, cfg.metastore.namespace, cfg.metastore.registry_lease_s, socket_timeout=5.0)

    def start_pools(self) -> None:
        """The prefill and decode actors; returns once every instance is ready (registered in the store)."""
        import ray

        from decode_worker.actor import DecodeActor
        from prefill_worker.actor import PrefillActor

        cfg, url = self.cfg, self.redis_url
        device = cfg.engine.device  # NOTE: "auto" is resolved by each engine on its own node; here, by the cluster
        gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        for role, pool, cls in (("prefill", cfg.pools.prefill, PrefillActor), ("decode", cfg.pools.decode,
                                                                                  DecodeActor)):
            engine_config, tp = cfg.pool_engine(role), pool.tensor_parallel_size
            for i in range(pool.replicas):
                iid = f"{role}-{i}"
                # NOTE: one actor per instance; its engine spawns the other TP ranks next to it, so the actor
                # reserves every rank's GPU (num_gpus=tp) and they land on one node.
                # NOTE: a lost instance comes back: Ray restarts its actor (the same arguments: it registers again
                # and the router's breaker for it closes on the new pid). Calls in flight when it died fail;
                # the router retries or moves them (router/recovery.py), so Ray must not retry them itself.
                actor_cls = ray.remote(cls).options(name=iid, namespace=self.ray_namespace, num_cpus=0,
                                                    num_gpus=tp if gpu else 0, max_concurrency=1000,
                                                    max_restarts=-1, max_task_retries=0)
                self.actors.append(actor_cls.remote(iid, engine_config, cfg.kv_transfer, url,
                                                    cfg.metastore.namespace, cfg.metastore.registry_lease_s))
        ray.get([a.ready.remote() for a in self.actors])

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop everything; with `drain_s`, each instance first drains (InstanceWorker.shutdown): decode instances
        before prefill instances, so a prefill instance's held KV is read or expires before it goes."""
        import ray

        for actor in reversed(self.actors):
            try:
                ray.get(actor.shutdown.remote(drain_s), timeout=drain_s + 30)
            except Exception as e:
                log.warning("actor shutdown failed: %s", e)
            ray.kill(actor)
        self.actors = []
        if self.ray_started:
            ray.shutdown()
            self.ray_started = False
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


class StartingRouter(pdserve_pb2_grpc.PDServeServicer):
    """Registered before the server starts (handlers cannot be added later); answers UNAVAILABLE until the pools
    are up and the real router is attached."""

    def __init__(self) -> None:
        self.target: Any = None
        self.draining = False  # set on SIGTERM: new calls are refused with UNAVAILABLE, running ones finish

    async def _ready(self, context: grpc.aio.ServicerContext) -> Any:
        if self.target is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "pdserve is starting: the pools are not ready yet")
        return self.target

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.draining:  # NOTE: only new requests: Abort, model info and loads still answer while draining
            await context.abort(grpc.StatusCode.UNAVAILABLE, "pdserve is draining (shutting down)")
        async for response in (await self._ready(context)).Generate(request, context):
            yield response

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await (await self._ready(context)).Abort(request, context)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await (await self._ready(context)).GetModelInfo(request, context)

    async def GetLoads(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await (await self._ready(context)).GetLoads(request, context)


REDIS_CHECK_S = 0.5


async def supervise_redis(server: RedisServer) -> None:
    """Restart the private redis-server whenever it dies (checked every REDIS_CHECK_S). NOTE: on the event loop's
    thread, not a worker thread: the restarted process's parent-death signal follows the thread that forked it."""
    while True:
        await asyncio.sleep(REDIS_CHECK_S)
        try:
            server.restart_if_dead()
        except RuntimeError as e:
            log.error("could not restart the private redis-server (%s); trying again", e)


async def serve(cfg: ServingConfig, stop: asyncio.Event | None = None,
                on_ready: Callable[[str], None] | None = None) -> int:
    """Serve until SIGINT/SIGTERM, or until `stop` is set when one is given (then no signal handlers are
    installed: the caller owns shutdown). `on_ready("HOST:PORT")` replaces the ready line on stdout."""
    from router.cluster_view import ClusterView
    from router.health import InstanceHealth
    from router.service import RouterService

    cluster = Cluster(cfg)
    try:
        store = cluster.start_infra()
    except BaseException:
        cluster.stop()
        raise
    if stop is None:
        # NOTE: after ray.init, which installs its own SIGTERM handler in the main thread (it would exit at once).
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(supervise_redis(cluster.redis)) if cluster.redis is not None else None
    drain_s = 0.0  # until the pools are up and serving: an error on the way stops everything at once
    server = grpc.aio.server()
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    router = StartingRouter()
    add_router_to_server(router, server)
    reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{cfg.server.host}:{cfg.server.port}")
    await server.start()  # health answers NOT_SERVING while the pools start
    try:
        await asyncio.to_thread(cluster.start_pools)
        # The router's model facts, read from the model directory with the engines' settings (no weights).
        srv = cfg.server
        info = ModelInfo.from_config(cfg.engine)  # NOTE: the facts every engine will have; no engine built here
        view = await asyncio.to_thread(ClusterView(store, cfg.placement).start)
        router.target = RouterService(info, load_tokenizer(info.model), view, cluster.ray_namespace,
                                      srv.max_inflight, srv.max_prompt_bytes, srv.prefill_timeout_s,
                                      srv.max_migrations, InstanceHealth(srv.breaker_threshold,
                                                                         srv.breaker_cooldown_s))
        for name in ("", SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if on_ready is not None:
            on_ready(f"{cfg.server.host}:{port}")
        else:
            print(f"pdserve: serving on {cfg.server.host}:{port}", flush=True)
            # NOTE: stdout carries that one line only. Ray's driver prints cluster events (e.g. "(raylet) A
            # worker died ...", when an instance is lost and restarted) to whatever sys.stdout is: stderr, the log.
            sys.stdout = sys.stderr
        await stop.wait()
        log.warning("draining: health NOT_SERVING, new requests refused, up to %.0f s for those in flight",
                    srv.drain_timeout_s)
        router.draining = True
        for name in ("", SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace=srv.drain_timeout_s)  # NOTE: refuses new calls at once, waits for running ones
        drain_s = srv.drain_timeout_s
    finally:
        if watchdog is not None:
            watchdog.cancel()  # NOTE: before the cluster stops Redis on purpose
        if router.target is not None:
            router.target.view.close()
        await asyncio.to_thread(cluster.stop, drain_s)
    return 0


def main(cfg: ServingConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(cfg))
