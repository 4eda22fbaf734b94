"""The router's in-memory cluster view (router/cluster_view.py) over a real redis-server: it follows the
instances' KV event streams in order, reads a snapshot where it cannot follow (a cold start, a trimmed stream,
a lapsed registration), and keeps serving its last state through an outage, counted."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from engine.block_pool import KVEvent
from metastore import MetadataStore, PlacementPolicy, RedisServer
from metastore.store import InstanceInfo, Load
from router.cluster_view import ClusterView


def inst(i: str) -> InstanceInfo:
    return InstanceInfo(instance_id=i, role="decode", address=i, tp_size=1, block_size=16, num_blocks=8,
                        max_num_seqs=4, pid=1)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until `check()` holds (fails after `timeout`)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_the_index_follows_kv_events_in_order(redis: RedisServer) -> None:
    store = MetadataStore(redis.url, "view", registry_lease_s=30)
    store.register(inst("a"))
    store.apply_kv_events("a", [KVEvent("stored", (1, 2, 3))])
    view = ClusterView(MetadataStore(redis.url, "view", socket_timeout=5), PlacementPolicy(), refresh_s=0.1).start()
    try:
        assert view.index.overlap([1, 2, 3, 4]) == {"a": 3}  # read as a snapshot before start() returned
        store.register(inst("b"))
        store.apply_kv_events("a", [KVEvent("removed", (2,)), KVEvent("stored", (2,)), KVEvent("removed", (3,))])
        store.apply_kv_events("b", [KVEvent("stored", (1, 2))])
        lag = eventually(lambda: view.index.overlap([1, 2, 3]) == {"a": 2, "b": 2})
        assert lag < 1.0  # a new instance: within a refresh; events: within an XREAD
        assert view.counters["index_resyncs"] == 0 and view.counters["index_events"] >= 3  # b: maybe a snapshot
        store.deregister("a")  # leaves the registry: its blocks leave the index
        eventually(lambda: view.index.overlap([1, 2]) == {"b": 2})
        assert [i.instance_id for i in view.state.instances] == ["b"]
    finally:
        view.close()


def test_a_trimmed_stream_or_a_lapsed_registration_is_read_again(redis: RedisServer) -> None:
    store = MetadataStore(redis.url, "view", registry_lease_s=30, event_stream_len=1)
    store.register(inst("a"))
    store.apply_kv_events("a", [KVEvent("stored", (1,))])
    view = ClusterView(MetadataStore(redis.url, "view"), PlacementPolicy())
    view.refresh()  # NOTE: by hand, no thread: the test decides when the view reads
    assert view.index.overlap([1]) == {"a": 1}
    for h in range(2, 300):  # far more entries than the stream keeps: the view's cursor is trimmed away
        store.apply_kv_events("a", [KVEvent("stored", (h,)), KVEvent("removed", (h - 1,))])
    assert store.r.xlen(store._k("kvev", "a")) < 200
    view._follow_streams(10)
    assert view.counters["index_resyncs"] == 1
    assert view.index.num_blocks("a") == 1 and view.index.overlap([299]) == {"a": 1}
    # The registration lapses (its record and stream are dropped) and the instance registers again with
    # other blocks, all between two reads of the view: the new stream restarts at 1, a gap the view sees.
    store.deregister("a")
    store.register(inst("a"))
    store.apply_kv_events("a", [KVEvent("stored", (7, 8))])
    view._follow_streams(10)
    assert view.counters["index_resyncs"] == 2 and view.index.overlap([7, 8]) == {"a": 2}
    assert view.index.overlap([299]) == {}


def test_an_outage_is_served_from_the_last_state_and_counted(redis: RedisServer) -> None:
    base = PlacementPolicy()
    store = MetadataStore(redis.url, "view", registry_lease_s=30)
    store.register(inst("d0"))
    store.heartbeat("d0", Load(waiting=2, running=1, kv_usage=0.5))
    store.set_policy(max_local_prefill_tokens=7)
    store.apply_kv_events("d0", [KVEvent("stored", (5, 6))])
    view = ClusterView(MetadataStore(redis.url, "view", socket_timeout=2), base, refresh_s=0.05,
                       recovery_s=30).start()
    try:
        assert view.state.loads["d0"].waiting == 2 and view.state.policy.max_local_prefill_tokens == 7
        assert not view.counters["store_fallbacks"]
        port = redis.port
        redis.proc.kill()  # type: ignore[union-attr]
        redis.proc.wait()  # type: ignore[union-attr]
        eventually(lambda: view.counters["store_fallbacks"] >= 2)
        state = view.state  # the last state, index included
        assert [i.instance_id for i in state.instances] == ["d0"] and state.loads["d0"].running == 1
        assert state.policy.max_local_prefill_tokens == 7 and view.index.overlap([5, 6]) == {"d0": 2}
        assert redis.restart_if_dead() and redis.port == port
        # Back, but empty until the instances re-register: for recovery_s the missing one is still used.
        store.register(inst("d1"))
        store.apply_kv_events("d1", [KVEvent("stored", (5,))])
        eventually(lambda: [i.instance_id for i in view.state.instances] == ["d0", "d1"])
        assert view.counters["store_partial_fallbacks"] >= 1
        eventually(lambda: view.index.overlap([5]).get("d1") == 1)  # read again from the new Redis
        store.register(inst("d0"))
        store.apply_kv_events("d0", [KVEvent("stored", (5, 6))])
        eventually(lambda: view.index.overlap([5, 6]) == {"d0": 2, "d1": 1})
    finally:
        view.close()


def test_a_new_router_has_the_whole_index_when_it_starts(redis: RedisServer) -> None:
    store = MetadataStore(redis.url, "view", registry_lease_s=30)
    for i in range(8):
        store.register(inst(f"d{i}"))
        store.apply_kv_events(f"d{i}", [KVEvent("stored", tuple(range(i * 10_000, (i + 1) * 10_000)))])
    t0 = time.monotonic()
    view = ClusterView(MetadataStore(redis.url, "view"), PlacementPolicy()).start()
    try:
        took = time.monotonic() - t0
        assert took < 2.0, f"80,000 blocks took {took:.2f} s to reach a new router"
        assert view.index.overlap([30_000, 30_001]) == {"d3": 2}
        assert sum(view.index.num_blocks(f"d{i}") for i in range(8)) == 80_000
    finally:
        view.close()
