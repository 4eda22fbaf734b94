"""`pdserve serve` with `server.routers: N >= 2`: the controller. It starts Redis, Ray and the pools (pdserve/
cluster.py; it stays the owner of the named actors), then N router processes (`pdserve router`, each its own Ray
driver attached to the same cluster and Redis, serving gRPC on its own port), and supervises them: a router that
dies is logged, counted and restarted on the port it had. It serves no gRPC itself.

On SIGTERM: the routers drain (SIGTERM to each: health NOT_SERVING, new calls refused, running ones finish within
server.drain_timeout_s), then the pools, Ray and Redis stop, in that order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pdserve.adaptive_split import start_adaptive
from pdserve.admin_executor import AdminExecutor
from pdserve.cluster import start_infra, stop_on_signals, supervise_redis
from pdserve.config import ServingConfig
from pdserve.node_watcher import NodeWatcher
from pdserve.ready_line import READY_PREFIX, ReadyLine

log = logging.getLogger(__name__)

CHECK_S = 0.2  # how often the controller looks at its routers
READY_TIMEOUT_S = 120.0  # a router process must print its ready line within this long
RESTART_BACKOFF_S = 0.5  # first restart delay; doubles while a router keeps dying young, up to the max
RESTART_BACKOFF_MAX_S = 10.0
STABLE_S = 30.0  # a router that served this long before dying restarts after the first delay again


class RouterProcess:
    """One supervised router: its index, its ports (gRPC and metrics; known once it first came up, when
    server.port or server.metrics_port is 0) and its current process."""

    def __init__(self, index: int, port: int, metrics_port: int = 0, http_port: int | None = None) -> None:
        self.index, self.port, self.metrics_port = index, port, metrics_port
        self.http_port = http_port  # None: the HTTP API is off
        self.proc: subprocess.Popen[str] | None = None
        self.ready: Future[ReadyLine] = Future()  # once the current process printed its ready line
        self.started_at = 0.0
        self.quick_deaths = 0  # deaths in a row, each before STABLE_S: the backoff's exponent
        self.restart_at: float | None = None  # when a dead router is due to be started again


class RouterSupervisor:
    def __init__(self, cfg: ServingConfig, router_args: list[str]) -> None:
        """`router_args`: what `pdserve router` needs besides the port (--config FILE, --model DIR)."""
        self.cfg, self.router_args = cfg, router_args
        srv = cfg.server
        self.routers = [RouterProcess(i, srv.port + i if srv.port else 0, srv.metrics_port + i if srv.metrics_port
                                      else 0, None if srv.http_port is None else srv.http_port + i if srv.http_port
                                      else 0) for i in range(srv.routers)]
        self.counters: Counter[str] = Counter()  # router_deaths, router_restarts, router_start_failures
        self.stopping = False

    def _spawn(self, r: RouterProcess) -> None:
        argv = [sys.executable, "-m", "pdserve.cli", "router", *self.router_args, "--port", str(r.port),
                "--metrics-port", str(r.metrics_port), "--parent-pid", str(os.getpid())]
        if r.http_port is not None:
            argv += ["--http-port", str(r.http_port)]
        # NOTE: stderr is inherited (the routers log into the controller's log); stdout is a pipe read for the
        # ready line. close_fds: the router must not hold the controller's sockets (Redis, Ray) open. This
        # process runs no gRPC server, so forking here is safe (see Cluster.start_infra).
        r.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, close_fds=True)
        r.ready, r.started_at = Future(), time.monotonic()
        threading.Thread(target=self._read_stdout, args=(r, r.proc, r.ready), daemon=True,
                         name=f"router-{r.index}-stdout").start()

    def _read_stdout(self, r: RouterProcess, proc: subprocess.Popen[str], ready: Future[ReadyLine]) -> None:
        """The first line is the ready line; anything after it goes to the log (a router prints nothing more, but
        a full pipe would block it)."""
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not ready.done() and line.startswith(READY_PREFIX):
                parsed = ReadyLine.parse(line)
                # NOTE: a restart comes back on these same ports
                r.port = int(parsed.targets[0].rsplit(":", 1)[1])
                r.metrics_port = int(parsed.metrics_urls[0].rsplit(":", 1)[1].split("/", 1)[0])
                if parsed.http_urls:
                    r.http_port = int(parsed.http_urls[0].rsplit(":", 1)[1])
                log.info("router %d pid %d port %d metrics port %d", r.index, proc.pid, r.port, r.metrics_port)
                ready.set_result(parsed)
            else:
                log.info("router %d stdout: %s", r.index, line)
        if not ready.done():
            ready.set_exception(RuntimeError(f"router {r.index} (pid {proc.pid}) exited before it was ready"))

    async def start(self) -> list[ReadyLine]:
        """Start every router; returns their ready lines once all are ready (raises if one is not)."""
        for r in self.routers:
            self._spawn(r)
        return [await asyncio.wait_for(asyncio.wrap_future(r.ready), READY_TIMEOUT_S) for r in self.routers]

    async def supervise(self) -> None:
        while not self.stopping:
            await asyncio.sleep(CHECK_S)
            now = time.monotonic()
            for r in self.routers:
                if self.stopping:
                    return
                if r.restart_at is not None:
                    if now >= r.restart_at:
                        r.restart_at = None
                        self.counters["router_restarts"] += 1
                        self._spawn(r)
                    continue
                assert r.proc is not None
                code = r.proc.poll()
                if code is None:
                    continue
                self.counters["router_deaths"] += 1
                lived = now - r.started_at
                r.quick_deaths = r.quick_deaths + 1 if lived < STABLE_S else 1
                delay = min(RESTART_BACKOFF_S * 2 ** (r.quick_deaths - 1), RESTART_BACKOFF_MAX_S)
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                if not r.ready.done() or r.ready.exception() is not None:
                    self.counters["router_start_failures"] += 1
                log.warning("router %d (pid %d, port %d) died (%s) after %.1f s; restarting it on port %d in "
                            "%.1f s (router deaths so far: %d)", r.index, r.proc.pid, r.port, how, lived, r.port,
                            delay, self.counters["router_deaths"])
                r.restart_at = now + delay

    def stop(self, drain_s: float) -> None:
        """SIGTERM every router (each drains), wait for them, kill what is left after drain_s + 15 s."""
        self.stopping = True
        live = [r.proc for r in self.routers if r.proc is not None and r.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + drain_s + 15
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("router pid %d did not exit within %.0f s of SIGTERM; killing it", p.pid, drain_s + 15)
                p.kill()
                p.wait(10)
            if p.returncode != 0:
                log.warning("router pid %d exited with %s on drain", p.pid, p.returncode)


async def run_controller(cfg: ServingConfig, router_args: list[str], stop: asyncio.Event | None = None,
                         on_ready: Callable[[ReadyLine], None] | None = None,
                         overrides: dict[str, Any] | None = None) -> int:
    """Serve through `server.routers` router processes until SIGINT/SIGTERM (or `stop`); run the Admin
    commands they post (pdserve/admin_executor.py)."""
    from pdserve.router_process import announce

    cluster, store = start_infra(cfg)
    stop = stop_on_signals(stop)
    watchdog = asyncio.create_task(supervise_redis(cluster.redis)) if cluster.redis is not None else None
    routers = RouterSupervisor(cfg, router_args)
    supervisor: asyncio.Task[None] | None = None
    executor: AdminExecutor | None = None
    adaptive = None
    watcher: NodeWatcher | None = None
    drain_s = 0.0  # until the routers are up: an error on the way stops everything at once
    try:
        await asyncio.to_thread(cluster.start_pools)
        watcher = NodeWatcher(cluster, store).start()
        executor = AdminExecutor(cluster, store, overrides).start()
        adaptive = start_adaptive(cfg.adaptive, cluster.redis_url, cfg.metastore.namespace, store, cluster.roles)
        ready = ReadyLine.join(await routers.start())
        supervisor = asyncio.create_task(routers.supervise())
        if on_ready is not None:
            on_ready(ready)
        else:
            announce(ready)
        await stop.wait()
        drain_s = cfg.server.drain_timeout_s
        log.warning("draining: SIGTERM to %d routers (up to %.0f s for their requests in flight)",
                    len(routers.routers), drain_s)
    finally:
        if adaptive is not None:
            await asyncio.to_thread(adaptive.stop)  # NOTE: first: it may be waiting on the executor
        if executor is not None:
            await asyncio.to_thread(executor.stop)  # NOTE: the change under way finishes first
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        if supervisor is not None:
            supervisor.cancel()
        await asyncio.to_thread(routers.stop, drain_s)
        log.info("routers: %s", dict(routers.counters) or "no deaths")
        if watchdog is not None:
            watchdog.cancel()  # NOTE: before the cluster stops Redis on purpose
        await asyncio.to_thread(cluster.stop, drain_s)
    return 0
