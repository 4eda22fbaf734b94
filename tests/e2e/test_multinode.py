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
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.e2e.netns import NodePair
from tests.e2e.ray_nodes import ROOT, env_for, serving_config, start_ray, start_redis, start_serve, worker_logs
from tests.model_factory import hf_greedy, random_prompts

pytestmark = pytest.mark.slow


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
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pdmn"))
    serve = None
    try:
        redis_url = start_redis(nodes, a, tmp)
        gcs = start_ray(nodes, tmp, {"node_a": 1}, {"node_b": 1})
        config = serving_config(tmp / "serving.yaml", redis_url, gcs, {
            "pools": {"prefill": {"node_resource": "node_b"}, "decode": {"node_resource": "node_a"}}})
        serve = start_serve(nodes, a, config, models["llama"], tmp)
        # Longer than placement.max_local_prefill_tokens (32): each is prefilled on B and its KV read by A.
        prompts = random_prompts(5, [40, 50, 64, 70, 90], 512, seed=1700)
        client = subprocess.run(nodes.cmd(a, sys.executable, "-m", "tests.e2e.multinode_client", serve.target,
                                          redis_url, json.dumps(prompts), "8"),
                                env=env_for(), cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert client.returncode == 0, client.stderr[-3000:] + serve.log.read_text()[-3000:]
        result = json.loads(client.stdout.strip().splitlines()[-1])
        assert result["outputs"] == [hf_greedy(models["llama"], p, 8) for p in prompts]
        assert all(r["disaggregated"] and r["transferred_blocks"] > 0 for r in result["routing"]), result["routing"]
        where = {i["role"]: i["node_ip"] for i in result["instances"]}
        assert where == {"prefill": b.ip, "decode": a.ip}, result["instances"]
        # The decode instance (the reader, on A) reports its read path from B: cross-node, over TCP.
        report = worker_logs(tmp, "a", "KV read path")
        assert report and all("(cross-node) from prefill-0-tp0-" in ln and f"@{b.ip}" in ln and
                              "runs over TCP (tcp/" in ln for ln in report), report
        assert serve.stop() == 0, serve.log.read_text()[-3000:]
    finally:
        if serve is not None:
            serve.kill()
        # NOTE: no `ray stop`: it kills every Ray process of this user on the machine, whatever the namespace;
        # the fixture's NodePair.close() kills exactly the processes inside our two namespaces.
        nodes.close()
        shutil.rmtree(tmp, ignore_errors=True)
