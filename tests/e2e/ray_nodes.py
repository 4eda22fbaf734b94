"""What the multi-node tests share: a Ray cluster on the two namespaces of tests/e2e/netns.py (Redis and Ray's head
on A, a worker node on B), a serving configuration pointing at it, and `pdserve serve` run inside a namespace.
Nothing here stops a process: NodePair.close() kills everything in the namespaces (never `ray stop`, which
stops every Ray process of the user on the machine, whatever its namespace)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from pdserve.config import merge_mappings
from pdserve.ready_line import READY_PREFIX, ReadyLine
from tests.e2e.netns import Node, NodePair

ROOT = pathlib.Path(__file__).resolve().parents[2]
VENV_BIN = pathlib.Path(sys.executable).parent
GCS_PORT, REDIS_PORT = 6380, 6390  # NOTE: fixed ports are safe: nothing else listens inside our namespaces


def env_for(node: Node | None = None, **extra: str) -> dict[str, str]:
    """`node`: set PDSERVE_NODE_IP (plain processes); None: leave it to the Ray actors (from Ray's node IP)."""
    # NOTE: PYTHONPATH first, so that these processes (and Ray's workers, which inherit the raylet's environment)
    # import this checkout's packages whatever the virtual environment has installed.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE",
           **extra}
    env.pop("PDSERVE_NODE_IP", None)
    env.pop("RAY_ADDRESS", None)
    return {**env, "PDSERVE_NODE_IP": node.ip} if node else env


def run_in(nodes: NodePair, node: Node, *argv: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """`argv` inside `node`'s namespace, to its end; its stdout (fails the test on a non-zero exit)."""
    proc = subprocess.run(nodes.cmd(node, *argv), env=env or env_for(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def start_redis(nodes: NodePair, node: Node, cwd: pathlib.Path) -> str:
    """A redis-server on `node`'s link address; its URL. NOTE: protected mode off: it refuses every client that
    is not on loopback (the other node's instances are not); it listens only inside our namespaces."""
    subprocess.Popen(nodes.cmd(node, "redis-server", "--bind", node.ip, "--port", str(REDIS_PORT), "--save", "",
                               "--appendonly", "no", "--protected-mode", "no"), stdout=subprocess.DEVNULL, cwd=cwd)
    return f"redis://{node.ip}:{REDIS_PORT}"


def start_ray(nodes: NodePair, tmp: pathlib.Path, resources_a: dict[str, float], resources_b: dict[str, float],
              head_env: dict[str, str] | None = None) -> str:
    """Ray's head on A and a worker node on B (`ray start`), each with its custom resources; the GCS address.
    NOTE: each node its own short Ray temp dir: two raylets of one session in one directory would share socket
    paths, and a long path overflows a Unix socket's 107 characters. `head_env`: RAY_* system settings for the
    head (e.g. how fast its GCS declares a node dead)."""
    a, b = nodes.a, nodes.b
    ray = str(VENV_BIN / "ray")
    common = ["--num-cpus", "2", "--disable-usage-stats"]
    run_in(nodes, a, ray, "start", "--head", "--node-ip-address", a.ip, "--port", str(GCS_PORT), "--resources",
           json.dumps(resources_a), "--temp-dir", str(tmp / "a"), "--include-dashboard=false", *common,
           env=env_for(**(head_env or {})))
    run_in(nodes, b, ray, "start", "--address", f"{a.ip}:{GCS_PORT}", "--node-ip-address", b.ip, "--resources",
           json.dumps(resources_b), "--temp-dir", str(tmp / "b"), *common)
    return f"{a.ip}:{GCS_PORT}"


def serving_config(path: pathlib.Path, redis_url: str, ray_address: str, overrides: dict[str, Any]) -> pathlib.Path:
    """deploy/ray/serving-tiny-cpu.yaml for this cluster (Redis, Ray, UCX over TCP), with `overrides`."""
    cfg = yaml.safe_load((ROOT / "deploy/ray/serving-tiny-cpu.yaml").read_text())
    merge_mappings(cfg, {"metastore": {"redis_url": redis_url}, "ray": {"address": ray_address},
                         "kv_transfer": {"ucx_tls": "tcp"}})
    merge_mappings(cfg, overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Serving:
    proc: subprocess.Popen[str]
    ready: ReadyLine
    log: pathlib.Path

    @property
    def target(self) -> str:
        return next(iter(self.ready.targets))

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a drain), then its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_serve(nodes: NodePair, node: Node, config: pathlib.Path, model: pathlib.Path,
                tmp: pathlib.Path) -> Serving:
    """`pdserve serve` inside `node`'s namespace, once it printed its ready line (its log: tmp/serve.log)."""
    log = tmp / "serve.log"
    proc = subprocess.Popen(nodes.cmd(node, sys.executable, "-m", "pdserve.cli", "serve", "--config", str(config),
                                      "--model", str(model), "--port", "0"),
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=ROOT,
                            env={**env_for(), "PDSERVE_RUNTIME_DIR": str(tmp / "run")})
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith(READY_PREFIX):
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"no ready line; log:\n{log.read_text()[-3000:]}")
    return Serving(proc, ReadyLine.parse(line), log)


def worker_logs(tmp: pathlib.Path, node_dir: str, needle: str) -> list[str]:
    """The lines with `needle` in the Ray worker logs of one node (its temp dir `tmp/node_dir`)."""
    return [ln for f in sorted((tmp / node_dir).glob("session_*/logs/worker-*.err"))
            for ln in f.read_text(errors="replace").splitlines() if needle in ln]
