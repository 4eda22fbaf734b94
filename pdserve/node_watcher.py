"""`pdserve serve`'s node watcher: every second, on its own thread (never the event loop), it asks Ray which nodes
are alive (`ray.nodes()`, one GCS call) and the registry where each instance runs (its `node_ip`), and keeps one
record per node in the store (metastore/nodes.py) for `pdserve status` and the routers' metrics.

When a node it saw alive is reported dead, it logs one line, once,

    pdserve: node 10.0.0.2 (NODE_ID) lost; instances there: prefill-0 (prefill), decode-1 (decode)

counts it (`lost_total`; the routers export the records as `pdserve:nodes_lost_total`), and from then on follows
what became of those instances. Ray restarts their actors (max_restarts=-1, pdserve/cluster.py) wherever
their resources fit; an instance pinned to a resource that no alive node offers stays pending, and the record
says so honestly ("restart pending: no alive node offers resource node_b"). The requests that ran there are not
the watcher's business: the router's recovery paths (router/recovery.py) retry or move them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from metastore import MetadataStore
from metastore.nodes import NodeInstance, NodeRecord, NodeState

if TYPE_CHECKING:
    from pdserve.cluster import Cluster

log = logging.getLogger(__name__)

POLL_S = 1.0
SERVING, NOT_REGISTERED = "serving", "not registered"


@dataclass(frozen=True)
class RayNode:
    """The part of `ray.nodes()`' entry the watcher uses."""

    node_id: str
    ip: str
    alive: bool
    resources: dict[str, float]

    @staticmethod
    def of(entry: dict[str, Any]) -> RayNode:
        return RayNode(entry["NodeID"], entry["NodeManagerAddress"], bool(entry["Alive"]),
                       dict(entry.get("Resources") or {}))


class NodeWatcher:
    def __init__(self, cluster: Cluster, store: MetadataStore, poll_s: float = POLL_S) -> None:
        self.cluster, self.store, self.poll_s = cluster, store, poll_s
        self.lost_total = 0
        self._seen_alive: set[str] = set()  # node ids seen alive: only those can be lost
        # lost node id -> (its ip, when, the instances there: (id, role, pid))
        self._lost: dict[str, tuple[str, float, tuple[tuple[str, str, int], ...]]] = {}
        self._where: dict[str, tuple[str, str, int]] = {}  # instance -> (node ip, role, pid) last registered
        self._written: dict[str, NodeRecord] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> NodeWatcher:
        self.store.clear_nodes()  # NOTE: records of an earlier `pdserve serve` on a shared Redis are not ours
        self._thread = threading.Thread(target=self._run, name="node-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as e:  # Redis or the GCS unreachable for a moment: try again next second
                log.warning("node watcher: %s: %s", type(e).__name__, e)

    def poll(self) -> None:
        import ray

        nodes = [RayNode.of(n) for n in ray.nodes()]
        registered = {i.instance_id: i for i in self.store.live_instances()}
        for iid, info in registered.items():
            self._where[iid] = (info.node_ip, info.role, info.pid)
        alive = [n for n in nodes if n.alive]
        for node in nodes:
            if node.alive:
                self._seen_alive.add(node.node_id)
            elif node.node_id in self._seen_alive and node.node_id not in self._lost:
                self._node_lost(node)
        available = ray.available_resources() if self._lost else {}
        pending: set[str] = set()
        records = []
        for node in alive:
            here = [(iid, role) for iid, (ip, role, _) in self._where.items() if ip == node.ip and iid in registered]
            records.append(NodeRecord(node.node_id, node.ip, NodeState.ALIVE,
                                      tuple(NodeInstance(i, r, SERVING) for i, r in sorted(here))))
        for node_id, (ip, when, there) in self._lost.items():
            instances = []
            for iid, role, pid in there:
                state = self._lost_instance_state(iid, pid, registered, alive, available)
                if state.startswith("restart pending"):
                    pending.add(iid)
                instances.append(NodeInstance(iid, role, state))
            records.append(NodeRecord(node_id, ip, NodeState.LOST, tuple(instances), when))
        self.cluster.unplaced = frozenset(pending)
        for record in records:
            if self._written.get(record.node_id) != record:
                self.store.write_node(record)
                self._written[record.node_id] = record

    def _node_lost(self, node: RayNode) -> None:
        there = tuple(sorted((iid, role, pid) for iid, (ip, role, pid) in self._where.items() if ip == node.ip))
        self._lost[node.node_id] = (node.ip, time.time(), there)
        self.lost_total += 1
        names = ", ".join(f"{iid} ({role})" for iid, role, _ in there) or "none"
        log.error("pdserve: node %s (%s) lost; instances there: %s", node.ip, node.node_id, names)

    def _lost_instance_state(self, iid: str, lost_pid: int, registered: dict[str, Any], alive: list[RayNode],
                             available: dict[str, float]) -> str:
        info = registered.get(iid)
        if info is not None and info.pid != lost_pid:  # NOTE: until its lease lapses, the old entry stays
            return f"serving again on {info.node_ip}"
        resources = self.cluster.resources.get(iid)
        if resources is None:
            return "removed from its pool"
        for name, amount in resources.items():
            if not any(name in n.resources for n in alive):
                return f"restart pending: no alive node offers resource {name}"
            if available.get(name, 0.0) < amount:
                return f"restart pending: every alive node's {name} is taken"
        return "restarting"
