"""`pdserve serve` in a subprocess for end-to-end tests, with a test-owned redis-server so tests can read and
tune the metadata store."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import yaml

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc
from metastore import MetadataStore, RedisServer
from pdserve.config import merge_mappings
from pdserve.ready_line import READY_PREFIX, ReadyLine

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, proc: subprocess.Popen[str], target: str, store: MetadataStore, log: pathlib.Path,
                 targets: list[str] | None = None) -> None:
        """`target`: the router this object's stub talks to; `targets`: every router of the cluster (the ready
        line's addresses, `server.routers` of them)."""
        self.proc, self.target, self.store, self.log = proc, target, store, log
        self.targets = targets or [target]
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PDServeStub(self.channel)
        self.config: pathlib.Path | None = None  # the serving YAML it runs (`pdserve router --config` reads it)
        self.env: dict[str, str] = {}  # the environment it runs in (its cluster file's directory)
        self.metrics_urls: list[str] = []  # router i's Prometheus endpoint (the ready line's)
        self.http_urls: list[str] = []  # router i's OpenAI-compatible HTTP API (with server.http_port set)

    @property
    def metrics_url(self) -> str:
        """The Prometheus endpoint of the router this object talks to."""
        return self.metrics_urls[self.targets.index(self.target)]

    @property
    def http_url(self) -> str:
        """The HTTP API base URL (http://HOST:PORT) of the router this object talks to."""
        return self.http_urls[self.targets.index(self.target)]

    def router(self, i: int) -> Server:
        """The same cluster through its router `i` (a new channel; close it after)."""
        other = Server(self.proc, self.targets[i], self.store, self.log, self.targets)
        other.config, other.env, other.metrics_urls = self.config, self.env, self.metrics_urls
        other.http_urls = self.http_urls
        return other

    def generate(self, tokens: list[int], max_tokens: int = 12, timeout: float = 60,
                 **sampling: object) -> list[pb.GenerateResponse]:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=tokens),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                            **sampling))
        return list(self.stub.Generate(req, timeout=timeout))

    def wait_idle(self, timeout: float = 15) -> None:
        """Every instance reports no running request and no KV block in use (from its heartbeats)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            loads = self.stub.GetLoads(pb.GetLoadsRequest()).instances
            if loads and all(i.running == 0 and i.waiting == 0 and i.kv_usage == 0 for i in loads):
                return
            time.sleep(0.2)
        raise AssertionError(f"instances not idle: {self.stub.GetLoads(pb.GetLoadsRequest())}")


class SlowStreams:
    """Greedy streams of `prompts` read by slow clients (one thread each, sleeping `delay_s` per message), so they
    are still in flight when a test strikes; `wait_started` returns once every stream has its first tokens."""

    def __init__(self, server: Server, prompts: list[list[int]], max_tokens: int, delay_s: float) -> None:
        self.server, self.prompts, self.max_tokens, self.delay_s = server, prompts, max_tokens, delay_s
        self.received: list[list[int]] = [[] for _ in prompts]
        self.finals: list[pb.GenerateResponse | None] = [None] * len(prompts)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._read, args=(i,)) for i in range(len(prompts))]
        for t in self.threads:
            t.start()

    def _read(self, i: int) -> None:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=self.prompts[i]), sampling=pb.SamplingParams(
            max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True))
        try:
            for msg in self.server.stub.Generate(request, timeout=120):
                self.received[i] += msg.token_ids
                self.finals[i] = msg
                time.sleep(self.delay_s)
        except grpc.RpcError as e:
            self.errors.append(f"{i}: {e.code().name}: {e.details()}")

    def wait_started(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(self.received):
            time.sleep(0.05)
        assert all(self.received), "not every stream had started"

    def join(self, timeout: float = 120.0) -> None:
        for t in self.threads:
            t.join(timeout)


@contextlib.contextmanager
def serve(tmp: pathlib.Path, model: pathlib.Path, edits: dict[str, Any] | None = None) -> Iterator[Server]:
    """Start `pdserve serve` on deploy/ray/serving-tiny-cpu.yaml (plus `edits`); stop it with SIGTERM after,
    checking it exits 0 having printed exactly one line. With `server.routers` N >= 2 in `edits` the ready line
    lists N addresses: the Server talks to the first, `Server.router(i)` to the others."""
    with RedisServer() as redis:
        cfg = yaml.safe_load((ROOT / "deploy/ray/serving-tiny-cpu.yaml").read_text())
        merge_mappings(cfg, {"metastore": {"redis_url": redis.url, "registry_lease_s": 2}, **(edits or {})})
        (tmp / "serving.yaml").write_text(yaml.safe_dump(cfg))
        log = tmp / "serve.log"
        # NOTE: its own runtime dir, so that `pdserve router` finds this cluster's file and no other's
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled",
               "PDSERVE_RUNTIME_DIR": str(tmp / "run")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli", "serve", "--config", str(tmp / "serving.yaml"), "--model",
             str(model), "--port", "0"], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env, cwd=ROOT)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line.startswith(READY_PREFIX), f"no ready line; log:\n{log.read_text()[-3000:]}"
            ready = ReadyLine.parse(line)
            targets = list(ready.targets)
            server = Server(proc, targets[0], MetadataStore(redis.url, registry_lease_s=2), log, targets)
            server.metrics_urls, server.http_urls = list(ready.metrics_urls), list(ready.http_urls)
            server.config, server.env = tmp / "serving.yaml", env
            yield server
            server.channel.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()[-3000:]
            rest = proc.stdout.read() if proc.stdout else ""
            assert rest == "", rest[-2000:]  # exactly one line on stdout
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
