"""The cluster's nodes as `pdserve serve`'s node watcher (pdserve/node_watcher.py) sees them, for operators: one
record per Ray node, alive or lost, with the instances that ran there and what became of them. Routers read
the records (router/cluster_view.py) into `pdserve status` and `pdserve:nodes_lost_total`.

    {ns}:nodes   HASH  Ray node id (hex) -> NodeRecord JSON

MetadataStore.write_node / nodes / clear_nodes read and write them. Written only by the pools' owner, on change;
cleared when it starts. Placement never reads them: a lost node's instances leave the registry on their own when
their leases lapse.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass


class NodeState(enum.StrEnum):
    ALIVE = "alive"
    LOST = "lost"


@dataclass(frozen=True)
class NodeInstance:
    """An instance that ran on the node (for a lost node: when it was lost) and its state now."""

    instance_id: str
    role: str
    state: str  # e.g. "serving", "restart pending: no alive node offers resource node_b"


@dataclass(frozen=True)
class NodeRecord:
    node_id: str  # Ray's node id, hex
    node_ip: str
    state: NodeState
    instances: tuple[NodeInstance, ...] = ()
    lost_at: float = 0.0  # unix time the watcher saw it lost; 0 while alive

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> NodeRecord:
        d = json.loads(text)
        return NodeRecord(d["node_id"], d["node_ip"], NodeState(d["state"]),
                          tuple(NodeInstance(**i) for i in d["instances"]), float(d["lost_at"]))


def sorted_nodes(records: Iterable[NodeRecord]) -> tuple[NodeRecord, ...]:
    """Alive nodes first, then by IP."""
    return tuple(sorted(records, key=lambda n: (n.state != NodeState.ALIVE, n.node_ip, n.node_id)))
