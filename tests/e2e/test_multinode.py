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
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.netns import Node, NodePair

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def env_for(node: Node) -> dict[str, str]:
    # NOTE: PYTHONPATH first, so that these processes (and Ray's workers, which inherit the raylet's environment)
    # import this checkout's packages whatever the virtual environment has installed.
    return {**os.environ, "PYTHONPATH": str(ROOT), "PDSERVE_NODE_IP": node.ip, "RAY_AUTH_MODE": "disabled",
            "OMP_WAIT_POLICY": "PASSIVE"}


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
