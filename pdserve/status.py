"""`pdserve status --target HOST:PORT`: one table of the cluster's instances as that router sees them (role, TP,
host, state, waiting/running, KV use, prefix-cache hit rate, restarts), the active placement policy and one line
per Ray node (alive or lost, and what became of a lost node's instances), from the router's GetLoads (its
memory: no Redis, no instance is asked)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import grpc

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc

COLUMNS = ("INSTANCE", "ROLE", "TP", "HOST", "PID", "STATE", "WAIT/RUN", "KV USE", "HIT RATE", "RESTARTS")


def rows_of(loads: pb.GetLoadsResponse) -> list[tuple[str, ...]]:
    out = []
    for i in loads.instances:
        kv = f"{i.kv_usage:.0%}" + (f" ({i.kv_blocks_used}/{i.kv_blocks_total})" if i.kv_blocks_total else "")
        out.append((i.instance_id, i.role, str(i.tensor_parallel_size), i.host or "-", str(i.pid or "-"),
                    i.state or "-", f"{i.waiting}/{i.running}", kv, f"{i.prefix_cache_hit_rate:.1%}",
                    str(i.restarts)))
    return out


def render(loads: pb.GetLoadsResponse, out: TextIO) -> None:
    """The table, then the policy, one `field=value` per item in a line."""
    table = [COLUMNS, *rows_of(loads)]
    widths = [max(len(r[c]) for r in table) for c in range(len(COLUMNS))]
    for r in table:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    if not loads.instances:
        out.write("(no instance registered)\n")
    policy = " ".join(f"{k}={v}" for k, v in sorted(loads.policy.items()))
    out.write(f"policy: {policy}\n")
    for node in loads.nodes:
        out.write(node_line(node) + "\n")


def node_line(node: pb.NodeStatus) -> str:
    """`node IP (ID): STATE; instances: ID (ROLE): STATE, ...` (the lost time in UTC)."""
    when = f" at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(node.lost_at))} UTC" if node.lost_at else ""
    there = ", ".join(f"{i.instance_id} ({i.role}): {i.state}" for i in node.instances) or "none"
    return f"node {node.node_ip} ({node.node_id}): {node.state}{when}; instances: {there}"


def main(target: str, timeout: float = 10.0, out: TextIO = sys.stdout, tls_ca: str | None = None) -> int:
    from pdserve.client_channel import channel as open_channel

    try:
        chan = open_channel(target, tls_ca)
    except OSError as e:
        print(f"pdserve status: --tls-ca: {e}", file=sys.stderr)
        return 2
    with chan as channel:
        try:
            loads = pb_grpc.PDServeStub(channel).GetLoads(pb.GetLoadsRequest(), timeout=timeout)
        except grpc.RpcError as e:
            print(f"pdserve status: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    render(loads, out)
    return 0
