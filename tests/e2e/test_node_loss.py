"""Losing a node mid-load: a two-node Ray cluster on network namespaces (tests/e2e/netns.py; Redis, Ray's head and
`pdserve serve` on A, a worker node on B), the prefill pool pinned to B and two decode instances spread over the
nodes (each node offers one `decode_slot`, and `pools.decode.max_per_node: 1` makes each decode actor ask for a
whole one). Twelve greedy streams run; once each has tokens, the raylet of node B is killed with kill -9 (its
workers, the instances there, go with it) and four more requests are sent at once.

What must hold: every request ends with transformers' greedy tokens (streams on B's decode instance move to A's,
prefills on B's instance are retried on A's decode instance); `pdserve serve` logs the node lost once, with the
instances that ran there; `pdserve status` shows the node lost and both instances' restarts pending (no alive
node offers `node_b`; A's `decode_slot` is taken); the routers export `pdserve:nodes_lost_total 1`; and
`pdserve serve` still drains and exits 0.

Needs root (`ip netns`). Everything started runs inside the two namespaces and is killed with them at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.netns import NodePair
from tests.e2e.ray_nodes import ROOT, env_for, run_in, serving_config, start_ray, start_redis, start_serve
from tests.model_factory import hf_greedy, random_prompts

pytestmark = pytest.mark.slow

MAX_TOKENS = 600  # NOTE: streams outlast B's workers (up to ~4 s after the kill), so B's are cut
# NOTE: the GCS declares a node dead after `failure_threshold` failed health checks `period_ms` apart (Ray's
# defaults: 5 x 3 s); a raylet killed here fails them at once (connection refused).
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@pytest.fixture
def nodes() -> Iterator[NodePair]:
    if os.geteuid() != 0:
        pytest.fail("the multi-node tests need root (ip netns)")
    with NodePair(tag=f"nl{os.getpid()}", subnet="10.78.1") as pair:
        yield pair


def raylet_pid(nodes: NodePair) -> int:
    for pid in nodes.pids(nodes.b):
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except FileNotFoundError:
            continue
        if cmd.endswith(b"/raylet"):
            return pid
    raise AssertionError("no raylet in node B's namespace")


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def status_until(nodes: NodePair, target: str, done: Callable[[str], bool], timeout: float) -> str:
    """`pdserve status` (the CLI, inside node A), every second until `done(its output)` or `timeout`; the last."""
    deadline = time.monotonic() + timeout
    while True:
        out = run_in(nodes, nodes.a, sys.executable, "-m", "pdserve.cli", "status", "--target", target)
        if done(out) or time.monotonic() > deadline:
            return out
        time.sleep(1)


def test_killed_raylet_requests_heal_and_the_node_is_reported_lost(nodes: NodePair,
                                                                   models: dict[str, pathlib.Path]) -> None:
    a, b = nodes.a, nodes.b
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pdnl"))
    serve = client = None
    try:
        redis_url = start_redis(nodes, a, tmp)
        gcs = start_ray(nodes, tmp, {"node_a": 1, "decode_slot": 1}, {"node_b": 1, "decode_slot": 1},
                        head_env=FAST_NODE_DEATH)
        config = serving_config(tmp / "serving.yaml", redis_url, gcs, {
            "pools": {"prefill": {"replicas": 1, "node_resource": "node_b"},
                      "decode": {"replicas": 2, "node_resource": "decode_slot", "max_per_node": 1}},
            "server": {"prefill_timeout_s": 10}, "metastore": {"registry_lease_s": 15}})
        serve = start_serve(nodes, a, config, models["llama"], tmp)
        # NOTE: the watcher writes the node records within a second, and the router reads them every second
        status = status_until(nodes, serve.target, lambda s: s.count("\nnode ") == 2, 15)
        placed = {ln.split()[1]: ln for ln in status.splitlines() if ln.startswith("node ")}
        assert set(placed) == {a.ip, b.ip} and "alive" in placed[b.ip], status
        where = status + serve.log.read_text()[-3000:]
        assert "prefill-0 (prefill): serving" in placed[b.ip] and placed[b.ip].count("(decode)") == 1, where
        assert placed[a.ip].count("(decode)") == 1, where

        # Longer than placement.max_local_prefill_tokens (32): prefilled on B, as long as B is there.
        wave1 = random_prompts(12, [40, 48, 56, 64], 512, seed=1900)
        wave2 = random_prompts(4, [40, 48, 56, 64], 512, seed=1901)
        client = subprocess.Popen(nodes.cmd(a, sys.executable, "-m", "tests.e2e.load_client", serve.target,
                                            str(MAX_TOKENS), json.dumps(wave1), json.dumps(wave2)),
                                  env=env_for(), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(tmp / "client.err", "w"), text=True)
        assert read_line(client, 120).strip() == "STREAMING", serve.log.read_text()[-3000:]
        os.kill(raylet_pid(nodes), signal.SIGKILL)
        killed_at = time.monotonic()
        # NOTE: B's workers outlive their raylet by a few seconds (each notices on its own that its raylet is
        # gone, then exits): the second wave goes once they are gone, while their registry leases (15 s)
        # still advertise them, so that its prefills are placed on the dead prefill instance and must be retried.
        instance_pids = {ln.split()[0]: int(ln.split()[4]) for ln in status.splitlines()
                         if ln.split() and ln.split()[0] in ("prefill-0", "decode-0", "decode-1")}
        on_b = [pid for iid, pid in instance_pids.items() if f"{iid} (" in placed[b.ip]]
        assert len(on_b) == 2 and wait_gone(on_b, 10), (instance_pids, placed)
        gone_s = time.monotonic() - killed_at
        assert gone_s < 12, f"B's instances outlived their raylet by {gone_s:.1f} s: too long for this test"
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=150)
        took = time.monotonic() - killed_at
        results = json.loads(out.strip().splitlines()[-1])
        log = serve.log.read_text()
        assert [r["error"] for r in results] == [None] * len(results), (results, log[-3000:])
        assert [r["tokens"] for r in results] == [hf_greedy(models["llama"], p, MAX_TOKENS) for p in wave1 + wave2]
        lost = re.findall(r"pdserve: node (\S+) \((\w+)\) lost; instances there: (.*)", log)
        assert len(lost) == 1 and lost[0][0] == b.ip, log[-3000:]
        decode_a = "decode-0" if "decode-1" in lost[0][2] else "decode-1"
        moved = [r for r in results if r["routing"]["migrations"]]
        # every stream ends on A's decode instance: those on B's moved there
        assert moved and all(r["routing"]["decode"] == decode_a for r in results), results
        # The second wave was placed while B's prefill instance was still registered: retried, prefilled on A.
        assert all(not r["routing"]["disaggregated"] for r in results[len(wave1):]), results
        assert re.search(rf"request \S+: prefill on prefill-0 failed \(.*\); retrying on {decode_a} \(local prefill\)",
                         log), log[-3000:]

        # The node watcher: one log line (above), the status, the metric.
        assert set(lost[0][2].split(", ")) == {"prefill-0 (prefill)", "decode-1 (decode)"} or \
            set(lost[0][2].split(", ")) == {"prefill-0 (prefill)", "decode-0 (decode)"}, lost
        on_b = lost[0][2]
        decode_b = "decode-1" if "decode-1" in on_b else "decode-0"
        # Ray restarts the lost instances' actors where they fit: nowhere, while B is gone.
        pending = ("prefill-0 (prefill): restart pending: no alive node offers resource node_b",
                   f"{decode_b} (decode): restart pending: every alive node's decode_slot is taken")
        status = status_until(nodes, serve.target, lambda s: all(p in s for p in pending), 30)
        line_b = next((ln for ln in status.splitlines() if ln.startswith(f"node {b.ip} ")), "")
        assert line_b.startswith(f"node {b.ip} ({lost[0][1]}): lost at "), status
        assert all(p in line_b for p in pending), status
        metrics = run_in(nodes, a, sys.executable, "-c", "import sys, urllib.request; "
                         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())",
                         serve.ready.metrics_urls[0])
        assert re.search(r"^pdserve:nodes_lost_total 1\.0$", metrics, re.M), metrics[-2000:]
        migrations = re.search(r'^pdserve:router_events_total\{component="recovery",event="migrations"\} (\S+)$',
                               metrics, re.M)
        assert migrations and float(migrations.group(1)) >= len(moved), metrics[-2000:]
        print(f"node loss: B's instances gone {gone_s:.1f} s after the kill; {len(results)} requests, {len(moved)} "
              f"moved, all done {took:.1f} s after the kill")
        assert serve.stop(90) == 0, serve.log.read_text()[-3000:]
    finally:
        for proc in (client, serve):
            if proc is not None:
                proc.kill()
        nodes.close()
        shutil.rmtree(tmp, ignore_errors=True)
