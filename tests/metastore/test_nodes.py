"""The node records (metastore/nodes.py) against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from metastore import MetadataStore, RedisServer
from metastore.nodes import NodeInstance, NodeRecord, NodeState


@pytest.fixture
def store() -> Iterator[MetadataStore]:
    with RedisServer() as server:
        s = MetadataStore(server.url, namespace="t-nodes")
        yield s
        s.close()


def test_records_round_trip_alive_first_and_clear(store: MetadataStore) -> None:
    lost = NodeRecord("bb", "10.0.0.2", NodeState.LOST, (
        NodeInstance("prefill-0", "prefill", "restart pending: no alive node offers resource node_b"),), 1.5e9)
    alive = NodeRecord("aa", "10.0.0.9", NodeState.ALIVE, (NodeInstance("decode-0", "decode", "serving"),))
    store.write_node(lost)
    store.write_node(alive)
    assert store.nodes() == (alive, lost)
    store.write_node(NodeRecord("aa", "10.0.0.9", NodeState.ALIVE))  # replaced, not added
    assert store.nodes() == (NodeRecord("aa", "10.0.0.9", NodeState.ALIVE), lost)
    store.clear_nodes()
    assert store.nodes() == ()
