"""KVEventSender against a real redis-server: events apply in the order they were put, batches queued during a
Redis call are coalesced into the next one, and a failed call is counted, never raised."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from engine.block_pool import KVEvent
from metastore import InstanceInfo, MetadataStore, RedisServer
from metastore.publisher import KVEventSender


@pytest.fixture
def store() -> Iterator[MetadataStore]:
    with RedisServer() as server:
        s = MetadataStore(server.url, namespace="pub", registry_lease_s=5.0)
        s.register(InstanceInfo(instance_id="i", role="decode", address="i", tp_size=1, block_size=16,
                                num_blocks=100, max_num_seqs=8))
        yield s
        s.close()


def test_events_apply_in_order_and_coalesce_while_a_call_is_under_way(store: MetadataStore) -> None:
    sender = KVEventSender(store, "i")
    # Hold every command for 300 ms, so the first call is under way while the later batches are put.
    store.r.execute_command("CLIENT", "PAUSE", 300, "ALL")
    batches = [[KVEvent("stored", (1, 2, 3))], [KVEvent("removed", (2,))], [KVEvent("stored", (7,))],
               [KVEvent("removed", (1,))], [KVEvent("stored", (2,))]]
    for b in batches:
        sender.put(b)
    assert sender.flush(5.0)
    assert sender.puts == 5 and sender.calls in (1, 2) and sender.failures == 0  # 2: the first went alone
    # Applied in order: 2 removed then re-stored, 1 removed, 3 and 7 kept.
    assert store.prefix_overlap([2, 3]) == {"i": 2}
    assert store.prefix_overlap([7]) == {"i": 1}
    assert store.prefix_overlap([1]) == {}
    sender.close()


def test_a_failed_call_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = KVEventSender(MetadataStore(f"redis://127.0.0.1:{port}", namespace="gone"), "i")
    with caplog.at_level(logging.WARNING, logger="metastore.publisher"):
        sender.put([KVEvent("stored", (1,))])
        assert sender.flush(10.0)
    assert sender.failures == 1 and sender.calls == 1
    assert "could not publish 1 KV events" in caplog.text
    sender.close()
