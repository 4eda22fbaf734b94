"""One router: its gRPC server (the PDServe service, grpc.health.v1, reflection), how its RouterService is built,
and `pdserve router`, a router process that attaches to a running cluster (Ray by its GCS address, the same
Redis) and looks the pools' actors up by name.

`pdserve serve` runs one of these in its own process (`server.routers: 1`), or, as the controller, supervises
`server.routers` router processes (pdserve/controller.py), each started as `pdserve router`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from api.v1 import pdserve_pb2_grpc
from engine.model_info import ModelInfo
from engine.tokenizer import load_tokenizer
from metastore import MetadataStore
from metastore.admin import AdminChannel
from pdserve.cluster import STORE_TIMEOUT_S
from pdserve.config import ServerConfig, ServingConfig, TlsConfig
from pdserve.http_server import HttpServer
from pdserve.metrics_server import MetricsServer
from pdserve.ready_line import ReadyLine
from pdserve.runtime import ClusterInfo
from pdserve.tls import grpc_credentials, ssl_context
from router.access import AccessControl
from router.admin_service import AdminService
from router.admission_queue import AdmissionQueue
from router.service import RouterService
from router.wire import ADMIN_SERVICE, SERVICE, add_admin_to_server, add_router_to_server

log = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0


def build_router(cfg: ServingConfig, store: MetadataStore, ray_namespace: str) -> RouterService:
    """The one place a RouterService is built from a serving configuration (the in-process router and every
    router process). The model's facts are read from the model directory with the engines' settings: no
    weights, no engine. Blocks while the cluster view reads the registry and the whole prefix index once
    (call it off the event loop); close the service after use (RouterService.close)."""
    from router.cluster_view import ClusterView
    from router.health import InstanceHealth

    srv = cfg.server
    info = ModelInfo.from_config(cfg.engine)
    view = ClusterView(store, cfg.placement).start()
    access = build_access(cfg, store)
    router = RouterService(info, load_tokenizer(info.model), view, ray_namespace, srv.max_inflight,
                           srv.max_prompt_bytes, srv.prefill_timeout_s, srv.max_migrations,
                           InstanceHealth(srv.breaker_threshold, srv.breaker_cooldown_s), access,
                           cfg.admission, AdmissionQueue(srv.max_inflight, srv.max_queued, srv.admission_timeout_s),
                           srv.layer_wise_kv)
    (log.warning if access.open else log.info)("%s", access.describe())
    return router


def build_access(cfg: ServingConfig, store: MetadataStore) -> AccessControl:
    """The router's API keys (the YAML's, overlaid by Redis's {ns}:apikeys, followed on a thread) and per-key
    limits (Redis token buckets); open when the YAML has no `auth.api_keys`."""
    from metastore.api_keys import ApiKeyStore
    from router.auth import KeyRing
    from router.rate_limit import RateLimiter

    if cfg.auth.api_keys is None:
        return AccessControl()
    keys = KeyRing(cfg.auth.api_keys, ApiKeyStore(store.r, store.ns)).start()
    return AccessControl(keys, RateLimiter(store.url, store.ns))


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


class RouterServer:
    """A router's gRPC server: health answers NOT_SERVING from `start` until `attach`, SERVING after, and
    NOT_SERVING again once `drain` begins. With `admin`, it serves the Admin service too (from `start` on: it
    needs only Redis; the pools' owner answers its commands once the pools are up)."""

    def __init__(self, srv: ServerConfig, admin: AdminService | None = None, tls: TlsConfig | None = None) -> None:
        self.srv, self.admin, self.tls = srv, admin, tls
        self.server = grpc.aio.server()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.router = StartingRouter()
        add_router_to_server(self.router, self.server)
        services = (SERVICE, reflection.SERVICE_NAME, health.SERVICE_NAME)
        if admin is not None:
            add_admin_to_server(admin, self.server)
            services += (ADMIN_SERVICE,)
        reflection.enable_server_reflection(services, self.server)
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set(self, status: Any) -> None:
        for name in ("", SERVICE):
            self.health.set(name, status)

    async def start(self, port: int) -> int:
        """Listen on `port` (0: a free one); returns the port bound."""
        address = f"{self.srv.host}:{port}"
        bound = (self.server.add_secure_port(address, grpc_credentials(self.tls)) if self.tls is not None
                 else self.server.add_insecure_port(address))
        await self.server.start()
        return bound

    def attach(self, target: RouterService) -> None:
        self.router.target = target
        if self.admin is not None:
            self.admin.access = target.access  # NOTE: the Admin service checks keys against the router's key ring
        self._set(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        log.warning("draining: health NOT_SERVING, new requests refused, up to %.0f s for those in flight",
                    self.srv.drain_timeout_s)
        self.router.draining = True
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace=self.srv.drain_timeout_s)  # NOTE: refuses new calls, waits for running ones
        if self.admin is not None:
            self.admin.close()


async def start_http(srv: ServerConfig, router: RouterService, port: int | None,
                     tls: TlsConfig | None = None) -> HttpServer | None:
    """The router's OpenAI-compatible HTTP API on `port` (0: a free one; None: off), on this event loop; HTTPS
    with `tls`."""
    if port is None:
        return None
    return await HttpServer.start(router, srv.host, port, srv.model_name, srv.drain_timeout_s,
                                  ssl_context(tls) if tls is not None else None)


async def drain_all(server: RouterServer, http: HttpServer | None) -> None:
    """Both fronts refuse new requests at once and give the running ones up to server.drain_timeout_s."""
    if http is None:
        await server.drain()
        return
    http.drain()
    await asyncio.gather(server.drain(), http.close())


def ready_line(srv: ServerConfig, port: int, metrics: MetricsServer, http: HttpServer | None) -> ReadyLine:
    return ReadyLine((f"{srv.host}:{port}",), (metrics.url,), (http.url,) if http else ())


def admin_service(redis_url: str, cfg: ServingConfig) -> AdminService:
    return AdminService(AdminChannel(redis_url, cfg.metastore.namespace), auth_required=cfg.auth.api_keys is not None)


def announce(ready: ReadyLine) -> None:
    """The ready line (pdserve/ready_line.py): stdout carries this one line only. NOTE: Ray's driver prints
    cluster events (e.g. "(raylet) A worker died ...", when an instance is lost and restarted) to whatever
    sys.stdout is: after the line, that is stderr, the log."""
    print(ready.format(), flush=True)
    sys.stdout = sys.stderr


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """A supervised router drains and exits when its controller is gone (it was reparented)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_S)
    log.warning("router pid %d: its controller (pid %d) is gone; draining and exiting", os.getpid(), parent_pid)
    stop.set()


async def serve_router(cfg: ServingConfig, cluster: ClusterInfo, port: int, parent_pid: int | None = None,
                       metrics_port: int = 0, http_port: int | None = None) -> int:
    """Serve as one more router of a running cluster until SIGINT/SIGTERM (or, with `parent_pid`, until that
    process is no longer this one's parent), then drain as `pdserve serve` does. Its Prometheus endpoint listens
    on `metrics_port` (0: a free one), its HTTP API on `http_port` (None: off)."""
    import ray

    # NOTE: attach to Ray before any gRPC thread exists in this process (see pdserve/controller.py's Cluster).
    ray.init(address=cluster.ray_address, namespace=cluster.ray_namespace, log_to_driver=False,
             configure_logging=False)
    try:
        store = MetadataStore(cluster.redis_url, cfg.metastore.namespace, cfg.metastore.registry_lease_s,
                              socket_timeout=STORE_TIMEOUT_S)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # NOTE: after ray.init, which installs its own handler
            loop.add_signal_handler(sig, stop.set)
        server = RouterServer(cfg.server, admin_service(cluster.redis_url, cfg), cfg.auth.tls)
        bound = await server.start(port)
        router = await asyncio.to_thread(build_router, cfg, store, cluster.ray_namespace)
        server.attach(router)
        await router.introductions.start()
        metrics = MetricsServer(router.metrics.registry, cfg.server.host, metrics_port)
        http = await start_http(cfg.server, router, http_port, cfg.auth.tls)
        log.info("router pid %d serving on %s:%d, metrics on %s", os.getpid(), cfg.server.host, bound, metrics.url)
        announce(ready_line(cfg.server, bound, metrics, http))
        watcher = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
        await stop.wait()
        if watcher is not None:
            watcher.cancel()
        await drain_all(server, http)
        metrics.close()
        router.close()
    finally:
        ray.shutdown()
    return 0


def main(cfg: ServingConfig, port: int | None = None, parent_pid: int | None = None,
         metrics_port: int | None = None, http_port: int | None = None) -> int:
    """`pdserve router`: 2 with one line on stderr when no cluster is found."""
    from pdserve.runtime import ClusterNotFoundError, find_cluster

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # NOTE: the CLI configured the root logger at WARNING already; pdserve's own INFO lines (which router runs
    # where, the cluster file) belong in the log too
    logging.getLogger("pdserve").setLevel(logging.INFO)
    try:
        cluster = find_cluster(cfg)
    except ClusterNotFoundError as e:
        print(f"pdserve router: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve_router(cfg, cluster, cfg.server.port if port is None else port, parent_pid,
                                    cfg.server.metrics_port if metrics_port is None else metrics_port,
                                    cfg.server.http_port if http_port is None else http_port))
