"""The node records (metastore/nodes.py) against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from metastore import MetadataStore, RedisServer
from metastore.nodes import NodeInstance, NodeRecord, NodeState, NodeTable


@pytest.fixture
def table() -> Iterator[NodeTable]:
    with RedisServer() as server:
        store = MetadataStore(server.url, namespace="t-nodes")
        yield NodeTable(store)
        store.close()


def test_records_round_trip_alive_first_and_clear(table: NodeTable) -> None:
    lost = NodeRecord("bb", "10.0.0.2", NodeState.LOST, (
        NodeInstance("prefill-0", "prefill", "restart pending: no alive node offers resource node_b"),), 1.5e9)
    alive = NodeRecord("aa", "10.0.0.9", NodeState.ALIVE, (NodeInstance("decode-0", "decode", "serving"),))
    table.write(lost)
    table.write(alive)
    assert table.read() == (alive, lost)
    table.write(NodeRecord("aa", "10.0.0.9", NodeState.ALIVE))  # replaced, not added
    assert table.read() == (NodeRecord("aa", "10.0.0.9", NodeState.ALIVE), lost)
    table.clear()
    assert table.read() == ()
