"""The router's view of the metadata store (router/store_view.py) over a real redis-server that is stopped and
started again: placement reads fall back to the last snapshot, counted, and recover."""

from __future__ import annotations

from metastore import MetadataStore, PlacementPolicy, RedisServer
from metastore.store import InstanceInfo, Load
from router.store_view import StoreView


def inst(i: str) -> InstanceInfo:
    return InstanceInfo(instance_id=i, role="decode", address=i, tp_size=1, block_size=16, num_blocks=8,
                        max_num_seqs=4, pid=1)


def test_an_outage_is_served_from_the_snapshot_and_counted() -> None:
    base = PlacementPolicy()
    with RedisServer() as redis:
        store = MetadataStore(redis.url, "view", registry_lease_s=30)
        store.register(inst("d0"))
        store.heartbeat("d0", Load(waiting=2, running=1, kv_usage=0.5))
        store.set_policy(max_local_prefill_tokens=7)
        view = StoreView(store)
        assert [i.instance_id for i in view.live_instances()] == ["d0"]
        assert view.loads(["d0"])["d0"].waiting == 2 and view.policy(base).max_local_prefill_tokens == 7
        assert view.prefix_overlap([1, 2]) == {} and not view.counters
        port = redis.port
        redis.proc.kill()  # type: ignore[union-attr]
        redis.proc.wait()  # type: ignore[union-attr]
        assert [i.instance_id for i in view.live_instances()] == ["d0"]  # the snapshot
        assert view.loads(["d0", "d9"]) == {"d0": Load(waiting=2, running=1, kv_usage=0.5), "d9": Load()}
        assert view.policy(base).max_local_prefill_tokens == 7 and view.prefix_overlap([1]) == {}
        assert view.counters["store_fallbacks"] == 4 and view.counters["store_fallbacks_instances"] == 1
        assert redis.restart_if_dead() and redis.port == port and redis.restarts == 1
        # Back, but empty until the instances re-register: still the snapshot, for recovery_s after the outage.
        view._retry_at = 0.0  # as if the backoff had passed
        assert [i.instance_id for i in view.live_instances()] == ["d0"]
        store.register(inst("d1"))  # one instance re-registered so far: the other is still used
        assert [i.instance_id for i in view.live_instances()] == ["d0", "d1"]
        assert view.counters["store_partial_fallbacks"] == 2
        store.register(inst("d0"))
        view._recovering_until = 0.0  # recovery over
        store.deregister("d0")
        assert [i.instance_id for i in view.live_instances()] == ["d1"]  # a lost instance is dropped again
        assert not redis.restart_if_dead()  # alive: nothing to do
