"""Placement decisions on exact inputs: affinity, load, conditional disaggregation, saturation."""

from __future__ import annotations

import pytest

from metastore import InstanceInfo, Load, PlacementPolicy
from router.placement import NoInstanceError, place, rendezvous


def inst(i: str, role: str) -> InstanceInfo:
    return InstanceInfo(instance_id=i, role=role, address=i, tp_size=1, block_size=16, num_blocks=100,
                        max_num_seqs=8)


D = [inst("d0", "decode"), inst("d1", "decode")]
P = [inst("p0", "prefill"), inst("p1", "prefill")]
POLICY = PlacementPolicy(max_local_prefill_tokens=64, prefill_queue_threshold=4)


def home(key: int, pool: list[InstanceInfo]) -> str:
    return min(pool, key=lambda i: rendezvous(key, i.instance_id)).instance_id


def test_short_prompt_is_prefilled_locally() -> None:
    p = place(40, D, P, {}, {}, POLICY, affinity_key=7)
    assert (p.decode_instance, p.prefill_instance, p.cached_tokens) == (home(7, D), None, 0)
    assert not p.disaggregated and "local" in p.reason


def test_ties_go_to_a_stable_home_per_prefix_and_spread_over_prefixes() -> None:
    homes = [place(500, D, P, {}, {}, POLICY, affinity_key=k).decode_instance for k in range(64)]
    assert homes == [place(500, D, P, {}, {}, POLICY, affinity_key=k).decode_instance for k in range(64)]
    assert 20 <= homes.count("d0") <= 44  # both instances take a fair share of new prefixes


def test_router_inflight_counts_when_ahead_of_reported_load() -> None:
    key = next(k for k in range(100) if home(k, D) == "d0")
    assert place(500, D, P, {}, {}, POLICY, affinity_key=key).decode_instance == "d0"
    assert place(500, D, P, {}, {}, POLICY, inflight={"d0": 3}, affinity_key=key).decode_instance == "d1"


def test_long_prompt_goes_to_the_least_loaded_prefill() -> None:
    loads = {"p0": Load(waiting=2), "p1": Load(waiting=0)}
    p = place(500, D, P, {}, loads, POLICY, affinity_key=7)
    assert (p.decode_instance, p.prefill_instance, p.effective_prefill_tokens) == (home(7, D), "p1", 500)


def test_cache_affinity_picks_the_instance_holding_the_prefix() -> None:
    p = place(500, D, P, {"d1": 20, "p1": 10}, {}, POLICY)
    assert p.decode_instance == "d1" and p.cached_tokens == 320 and p.prefill_instance == "p1"


def test_mostly_cached_long_prompt_is_prefilled_locally() -> None:
    p = place(500, D, P, {"d1": 29}, {}, POLICY)  # 464 cached, 36 to compute
    assert (p.decode_instance, p.prefill_instance, p.effective_prefill_tokens) == ("d1", None, 36)


def test_load_outweighs_a_small_overlap() -> None:
    loads = {"d1": Load(running=8, kv_usage=0.9)}
    p = place(500, D, P, {"d1": 2}, loads, POLICY)
    assert p.decode_instance == "d0"


def test_saturated_prefill_pool_falls_back_to_local() -> None:
    loads = {"p0": Load(waiting=4), "p1": Load(waiting=9)}
    p = place(500, D, P, {}, loads, POLICY)
    assert p.prefill_instance is None and "saturated" in p.reason


def test_whole_prompt_cached_still_computes_one_token() -> None:
    p = place(32, D, P, {"d0": 2}, {}, POLICY)
    assert p.cached_tokens == 31 and p.effective_prefill_tokens == 1


def test_no_decode_instance_is_unavailable() -> None:
    with pytest.raises(NoInstanceError):
        place(10, [], P, {}, {}, POLICY)


def test_token_queue_trigger_prefills_locally_when_every_prefill_queue_is_longer() -> None:
    """max_prefill_queue_tokens: remote until every prefill instance has that many tokens queued (the larger of
    the heartbeat's figure and the router's own pending count), then local while the decode instance's queue
    is shorter; the request-count trigger alone would still send it remote (no one is `waiting`)."""
    policy = PlacementPolicy(max_local_prefill_tokens=64, prefill_queue_threshold=4, max_prefill_queue_tokens=6000)
    key = next(k for k in range(100) if home(k, D) == "d0")
    loads = {"p0": Load(queued_prefill_tokens=7000)}

    def where(pending: dict[str, int]) -> str | None:
        return place(3000, D, P, {}, loads, policy, affinity_key=key, pending_prefill=pending).prefill_instance

    assert where({}) == "p1"  # p1's queue is empty
    assert where({"p1": 5999}) == "p1"  # just under the threshold
    local = place(3000, D, P, {}, loads, policy, affinity_key=key, pending_prefill={"p1": 6000})
    assert (local.prefill_instance, local.decode_instance) == (None, "d0")
    assert "6000 tokens queued" in local.reason
    assert where({"p1": 6000, "d0": 6000}) == "p1"  # the local queue is no shorter: stay remote
    off = PlacementPolicy(max_local_prefill_tokens=64, prefill_queue_threshold=4)
    assert place(3000, D, P, {}, loads, off, affinity_key=key, pending_prefill={"p1": 9000}).prefill_instance == "p1"
