"""Two network nodes on one machine (tests/e2e/netns.py: namespaces A and B, 10.77.0.1 and 10.77.0.2 on a veth
link): KV crosses a real network boundary over UCX's TCP transport.

- two plain processes, a NIXL holder on B and a reader on A: every block arrives byte-identical, and the
  transport report calls the path cross-node over TCP;
- a Ray cluster of two nodes (head and Redis on A, a worker node on B) serving with `pdserve serve` (on A), the
  prefill pool pinned to B and the decode pool to A: disaggregated prompts give transformers' greedy tokens.

Needs root (`ip netns`). Everything started runs inside the two namespaces and is killed with them at the end,
whatever happened.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import yaml

from pdserve.config import merge_mappings
from pdserve.ready_line import READY_PREFIX, ReadyLine
from tests.e2e.netns import Node, NodePair
from tests.model_factory import hf_greedy, random_prompts

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


VENV_BIN = pathlib.Path(sys.executable).parent
GCS_PORT, REDIS_PORT = 6380, 6390  # NOTE: fixed ports are safe: nothing else listens inside our namespaces


def env_for(node: Node | None = None) -> dict[str, str]:
    """`node`: set PDSERVE_NODE_IP (plain processes); None: leave it to the Ray actors (from Ray's node IP)."""
    # NOTE: PYTHONPATH first, so that these processes (and Ray's workers, which inherit the raylet's environment)
    # import this checkout's packages whatever the virtual environment has installed.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("PDSERVE_NODE_IP", None)
    env.pop("RAY_ADDRESS", None)
    return {**env, "PDSERVE_NODE_IP": node.ip} if node else env


def run_in(nodes: NodePair, node: Node, *argv: str, timeout: float = 120) -> None:
    proc = subprocess.run(nodes.cmd(node, *argv), env=env_for(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


@pytest.fixture
def nodes() -> Iterator[NodePair]:
    if os.geteuid() != 0:
        pytest.fail("the multi-node tests need root (ip netns)")
    with NodePair() as pair:
        yield pair


def test_nixl_reads_kv_across_the_network_over_tcp(nodes: NodePair) -> None:
    a, b = nodes.a, nodes.b
    peer = [sys.executable, "-m", "tests.e2e.nixl_peer"]
    holder = subprocess.Popen(nodes.cmd(b, *peer, "holder", b.ip, "7001", "32"), env=env_for(b), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reader = subprocess.run(nodes.cmd(a, *peer, "reader", b.ip, "7001", "32"), env=env_for(a), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    _, holder_err = holder.communicate(timeout=30)
    assert reader.returncode == 0 and holder.returncode == 0, reader.stderr[-3000:] + holder_err[-3000:]
    result = json.loads(reader.stdout.strip().splitlines()[-1])
    assert result["done"] and result["identical"], result
    assert result["remote_node_ip"] == b.ip
    report = [line for line in reader.stderr.splitlines() if "KV read path" in line]
    assert len(report) == 1 and "(cross-node) from holder-tp0-" in report[0] and f"@{b.ip}" in report[0], report
    assert "runs over TCP (tcp/" in report[0], report


def test_serve_with_prefill_and_decode_on_two_ray_nodes(nodes: NodePair, models: dict[str, pathlib.Path]) -> None:
    a, b = nodes.a, nodes.b
    # NOTE: each node its own short Ray temp dir: two raylets of one session in one directory would share
    # socket paths, and a long path overflows a Unix socket's 107 characters.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pdmn"))
    serve: subprocess.Popen[str] | None = None
    try:
        # NOTE: protected mode off: it refuses every client that is not on loopback (node B's instances are
        # not); the server listens only on node A's link address, inside our namespaces.
        subprocess.Popen(nodes.cmd(a, "redis-server", "--bind", a.ip, "--port", str(REDIS_PORT), "--save", "",
                                   "--appendonly", "no", "--protected-mode", "no"), stdout=subprocess.DEVNULL, cwd=tmp)
        ray = str(VENV_BIN / "ray")
        common = ["--num-cpus", "2", "--disable-usage-stats"]
        run_in(nodes, a, ray, "start", "--head", "--node-ip-address", a.ip, "--port", str(GCS_PORT), "--resources",
               '{"node_a": 1}', "--temp-dir", str(tmp / "a"), "--include-dashboard=false", *common)
        run_in(nodes, b, ray, "start", "--address", f"{a.ip}:{GCS_PORT}", "--node-ip-address", b.ip, "--resources",
               '{"node_b": 1}', "--temp-dir", str(tmp / "b"), *common)
        redis_url = f"redis://{a.ip}:{REDIS_PORT}"
        cfg = yaml.safe_load((ROOT / "deploy/ray/serving-tiny-cpu.yaml").read_text())
        merge_mappings(cfg, {"metastore": {"redis_url": redis_url}, "ray": {"address": f"{a.ip}:{GCS_PORT}"},
                             "pools": {"prefill": {"node_resource": "node_b"}, "decode": {"node_resource": "node_a"}},
                             "kv_transfer": {"ucx_tls": "tcp"}})
        (tmp / "serving.yaml").write_text(yaml.safe_dump(cfg))
        log = tmp / "serve.log"
        serve = subprocess.Popen(nodes.cmd(a, sys.executable, "-m", "pdserve.cli", "serve", "--config",
                                           str(tmp / "serving.yaml"), "--model", str(models["llama"]), "--port", "0"),
                                 stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=ROOT,
                                 env={**env_for(), "PDSERVE_RUNTIME_DIR": str(tmp / "run")})
        line = serve.stdout.readline() if serve.stdout else ""
        assert line.startswith(READY_PREFIX), f"no ready line; log:\n{log.read_text()[-3000:]}"
        target = next(iter(ReadyLine.parse(line).targets))
        # Longer than placement.max_local_prefill_tokens (32): each is prefilled on B and its KV read by A.
        prompts = random_prompts(5, [40, 50, 64, 70, 90], 512, seed=1700)
        client = subprocess.run(nodes.cmd(a, sys.executable, "-m", "tests.e2e.multinode_client", target, redis_url,
                                          json.dumps(prompts), "8"),
                                env=env_for(), cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert client.returncode == 0, client.stderr[-3000:] + log.read_text()[-3000:]
        result = json.loads(client.stdout.strip().splitlines()[-1])
        assert result["outputs"] == [hf_greedy(models["llama"], p, 8) for p in prompts]
        assert all(r["disaggregated"] and r["transferred_blocks"] > 0 for r in result["routing"]), result["routing"]
        where = {i["role"]: i["node_ip"] for i in result["instances"]}
        assert where == {"prefill": b.ip, "decode": a.ip}, result["instances"]
        # The decode instance (the reader, on A) reports its read path from B: cross-node, over TCP.
        report = [ln for f in sorted((tmp / "a").glob("session_*/logs/worker-*.err")) for ln in
                  f.read_text(errors="replace").splitlines() if "KV read path" in ln]
        assert report and all("(cross-node) from prefill-0-tp0-" in ln and f"@{b.ip}" in ln and
                              "runs over TCP (tcp/" in ln for ln in report), report
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if serve is not None and serve.poll() is None:
            serve.kill()
            serve.wait(10)
        # NOTE: no `ray stop`: it kills every Ray process of this user on the machine, whatever the namespace;
        # the fixture's NodePair.close() kills exactly the processes inside our two namespaces.
        nodes.close()
        shutil.rmtree(tmp, ignore_errors=True)
