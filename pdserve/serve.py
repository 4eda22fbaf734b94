"""`pdserve serve`: Redis (private unless configured), Ray (configured, RAY_ADDRESS, or local), the prefill and
decode pools as Ray actors (pdserve/cluster.py), and the gRPC router in this process (pdserve/router_process.py),
or, with `server.routers` >= 2, that many supervised router processes (pdserve/controller.py). Prints exactly one
line to stdout once healthy and shuts down everything it started on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from pdserve.adaptive_metrics import AdaptiveCollector
from pdserve.adaptive_split import start_adaptive
from pdserve.admin_executor import AdminExecutor
from pdserve.cluster import start_infra, stop_on_signals, supervise_redis
from pdserve.config import ServingConfig
from pdserve.controller import run_controller
from pdserve.metrics_server import MetricsServer
from pdserve.node_watcher import NodeWatcher
from pdserve.ready_line import ReadyLine
from pdserve.router_process import (
    RouterServer,
    admin_service,
    announce,
    build_router,
    drain_all,
    ready_line,
    start_http,
)

log = logging.getLogger(__name__)


async def serve(cfg: ServingConfig, stop: asyncio.Event | None = None,
                on_ready: Callable[[ReadyLine], None] | None = None, router_args: list[str] | None = None,
                overrides: dict[str, Any] | None = None) -> int:
    """Serve until SIGINT/SIGTERM, or until `stop` is set when one is given (then no signal handlers are
    installed: the caller owns shutdown). `on_ready(ReadyLine)` replaces the ready line on stdout. With
    `server.routers` >= 2 this process is the controller of that many router processes (pdserve/controller.py),
    started as `pdserve router` with `router_args` (--config FILE, ...) and the ready line lists every router.
    Either way this process runs the Admin commands (pdserve/admin_executor.py); `overrides` are the dotted keys
    set on the command line, applied to a configuration `pdserve apply` sends as they were to the file."""
    if cfg.server.routers > 1:
        if router_args is None:
            raise ValueError("server.routers > 1 needs the configuration file the router processes read")
        return await run_controller(cfg, router_args, stop, on_ready, overrides)
    cluster, store = start_infra(cfg)
    stop = stop_on_signals(stop)
    watchdog = asyncio.create_task(supervise_redis(cluster.redis)) if cluster.redis is not None else None
    drain_s = 0.0  # until the pools are up and serving: an error on the way stops everything at once
    server = RouterServer(cfg.server, admin_service(cluster.redis_url, cfg), cfg.auth.tls)
    port = await server.start(cfg.server.port)  # health answers NOT_SERVING while the pools start
    router = metrics = executor = http = adaptive = watcher = None
    try:
        await asyncio.to_thread(cluster.start_pools)
        watcher = NodeWatcher(cluster, store).start()
        executor = AdminExecutor(cluster, store, overrides).start()
        adaptive = start_adaptive(cfg.adaptive, cluster.redis_url, cfg.metastore.namespace, store, cluster.roles)
        router = await asyncio.to_thread(build_router, cfg, store, cluster.ray_namespace)
        server.attach(router)
        await router.introductions.start()  # NOTE: before the ready line: the first request finds its pair met
        if adaptive is not None:
            router.slo_tally = adaptive.router_tally()
            router.metrics.registry.register(AdaptiveCollector(adaptive))
        metrics = MetricsServer(router.metrics.registry, cfg.server.host, cfg.server.metrics_port)
        http = await start_http(cfg.server, router, cfg.server.http_port, cfg.auth.tls)
        ready = ready_line(cfg.server, port, metrics, http)
        if on_ready is not None:
            on_ready(ready)
        else:
            announce(ready)
        await stop.wait()
        await drain_all(server, http)
        http = None
        drain_s = cfg.server.drain_timeout_s
    finally:
        if adaptive is not None:
            await asyncio.to_thread(adaptive.stop)  # NOTE: first: it may be waiting on the executor
        if executor is not None:
            await asyncio.to_thread(executor.stop)
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        if watchdog is not None:
            watchdog.cancel()  # NOTE: before the cluster stops Redis on purpose
        if http is not None:  # NOTE: an error before the drain
            await http.close()
        if metrics is not None:
            metrics.close()
        if router is not None:
            router.close()
        await asyncio.to_thread(cluster.stop, drain_s)
    return 0


def main(cfg: ServingConfig, router_args: list[str] | None = None, overrides: dict[str, Any] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # NOTE: the CLI configured the root logger at WARNING already; pdserve's own INFO lines (which router runs
    # where, the cluster file) belong in the log too
    logging.getLogger("pdserve").setLevel(logging.INFO)
    return asyncio.run(serve(cfg, router_args=router_args, overrides=overrides))
