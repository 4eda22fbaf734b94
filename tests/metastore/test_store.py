"""The metadata store against a real redis-server (started privately on a loopback port)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from engine.block_pool import KVEvent
from metastore import InstanceInfo, InstanceStatsRecord, Load, MetadataStore, PlacementPolicy, RedisServer


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def store(redis_url: str, request: pytest.FixtureRequest) -> Iterator[MetadataStore]:
    s = MetadataStore(redis_url, namespace=f"t-{request.node.name}", registry_lease_s=1.0)
    yield s
    s.close()


def info(i: str, role: str = "decode") -> InstanceInfo:
    return InstanceInfo(instance_id=i, role=role, address=f"actor-{i}", tp_size=1, block_size=16, num_blocks=100,
                        max_num_seqs=8)


def test_registry_lease_expires_without_heartbeats(store: MetadataStore) -> None:
    store.register(info("d0"))
    store.register(info("p0", "prefill"))
    assert [i.instance_id for i in store.live_instances()] == ["d0", "p0"]
    assert [i.instance_id for i in store.live_instances("prefill")] == ["p0"]
    for _ in range(3):  # d0 keeps heartbeating for 1.5 s, p0 does not
        time.sleep(0.5)
        assert store.heartbeat("d0", Load(waiting=1, running=2, kv_usage=0.25))
    assert [i.instance_id for i in store.live_instances()] == ["d0"]
    assert not store.heartbeat("p0")  # its record is gone: it must re-register
    assert store.loads(["d0"])["d0"] == Load(waiting=1, running=2, kv_usage=0.25)


def test_stats_record_rides_the_heartbeat_and_leaves_with_the_instance(store: MetadataStore) -> None:
    store.register(info("d0"))
    record = InstanceStatsRecord(heartbeat_seq=7, kv_blocks_used=3, kv_blocks_total=100, kv_transfer_bytes=1 << 20,
                                 kv_transfer_seconds=0.5)
    assert store.heartbeat("d0", Load(), record)
    assert store.instance_stats(["d0", "p9"]) == {"d0": record}
    assert store.r.ttl(f"{store.ns}:stats:d0") > 0  # lapses with the lease
    assert InstanceStatsRecord.from_json('{"waiting": 2, "from_a_newer_instance": 1}').waiting == 2
    store.deregister("d0")
    assert store.instance_stats(["d0"]) == {}


def test_block_index_follows_kv_events_and_prefix_overlap(store: MetadataStore) -> None:
    for i in ("a", "b"):
        store.register(info(i))
    store.apply_kv_events("a", [KVEvent("stored", (1, 2, 3))])
    store.apply_kv_events("b", [KVEvent("stored", (1, 2)), KVEvent("stored", (9,))])
    assert store.prefix_overlap([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert store.prefix_overlap([9, 5, 1]) == {"b": 1}  # leading blocks only: stops at the first miss
    assert store.prefix_overlap([5]) == {}
    store.apply_kv_events("a", [KVEvent("removed", (2,))])
    assert store.prefix_overlap([1, 2, 3]) == {"a": 1, "b": 2}
    store.deregister("b")
    assert store.prefix_overlap([1, 2, 3]) == {"a": 1}


def test_kv_events_apply_in_order_across_script_chunks(store: MetadataStore) -> None:
    """One call with an event larger than a script chunk (4,000 hashes), then a removal and a re-store of the
    same blocks in one batch: events apply in order, and the instance's block set matches the block keys."""
    store.register(info("big"))
    hashes = tuple(range(1, 4102))
    store.apply_kv_events("big", [KVEvent("stored", hashes), KVEvent("removed", (5, 4101)), KVEvent("stored", (5,))])
    assert store.prefix_overlap(list(hashes[:4100])) == {"big": 4100}
    assert store.prefix_overlap([4101]) == {}
    assert store.r.scard(store._k("iblk", "big")) == 4100
    store.apply_kv_events("big", [KVEvent("removed", hashes)])
    assert store.r.scard(store._k("iblk", "big")) == 0 and store.prefix_overlap([1]) == {}


def test_dead_instance_leaves_the_block_index(store: MetadataStore) -> None:
    store.register(info("x"))
    store.apply_kv_events("x", [KVEvent("stored", (7, 8))])
    assert store.prefix_overlap([7, 8]) == {"x": 2}
    time.sleep(1.2)
    assert store.live_instances() == []
    assert store.prefix_overlap([7, 8]) == {}


def test_policy_changes_at_runtime_and_is_validated(store: MetadataStore) -> None:
    base = PlacementPolicy(max_local_prefill_tokens=100)
    assert store.policy(base) == base
    changed = store.set_policy(max_local_prefill_tokens=32, overlap_weight=2.5)
    assert changed.max_local_prefill_tokens == 32 and changed.overlap_weight == 2.5
    assert store.policy(base).max_local_prefill_tokens == 32
    with pytest.raises(ValueError, match="max_local_prefill_tokens"):
        store.set_policy(max_local_prefill_tokens=-1)
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        store.set_policy(nope=1)
    assert store.policy(base).max_local_prefill_tokens == 32  # a refused change leaves the policy as it was
