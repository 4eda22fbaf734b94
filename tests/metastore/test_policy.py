"""PlacementPolicy: construction validates every field, and the Redis form round-trips, overrides a base and
refuses unknown keys and non-numbers naming the key."""

from __future__ import annotations

import pytest

from metastore import PlacementPolicy


def test_policy_rejects_a_fractional_token_threshold() -> None:
    with pytest.raises(ValueError, match="max_prefill_queue_tokens"):
        PlacementPolicy(max_prefill_queue_tokens=1.5)  # type: ignore[arg-type]


def test_redis_form_round_trips_exactly() -> None:
    policy = PlacementPolicy(max_local_prefill_tokens=64, prefill_queue_threshold=3, max_prefill_queue_tokens=900,
                             overlap_weight=2.5, load_weight=0.0, kv_weight=1.0)
    stored = policy.to_redis()
    assert stored == {"max_local_prefill_tokens": "64", "prefill_queue_threshold": "3",
                      "max_prefill_queue_tokens": "900", "overlap_weight": "2.5", "load_weight": "0.0",
                      "kv_weight": "1.0", "shared_prefix_fanout": "8"}
    as_redis_returns_it = {k.encode(): v.encode() for k, v in stored.items()}  # a client without decode_responses
    assert PlacementPolicy.from_redis(as_redis_returns_it) == policy
    assert PlacementPolicy.from_redis(stored) == policy


def test_stored_values_override_the_base() -> None:
    base = PlacementPolicy(max_local_prefill_tokens=128, kv_weight=0.25)
    got = PlacementPolicy.from_redis({b"overlap_weight": b"3"}, base)
    assert got == PlacementPolicy(max_local_prefill_tokens=128, kv_weight=0.25, overlap_weight=3)
    assert PlacementPolicy.from_redis({}, base) == base
    assert PlacementPolicy.from_redis({}) == PlacementPolicy()


@pytest.mark.parametrize(("raw", "message"), [
    ({"nope": "1"}, "placement policy: unknown key 'nope'; known: max_local_prefill_tokens, "),
    ({b"kv_weight": b"high"}, r"placement policy kv_weight: b'high' is not a number"),
    ({"kv_weight": "-1"}, r"placement policy kv_weight: -1 must be a number >= 0"),
    ({"kv_weight": '"1"'}, r"placement policy kv_weight: '1' must be a number >= 0"),
    ({"load_weight": "true"}, r"placement policy load_weight: True must be a number >= 0"),
    ({"prefill_queue_threshold": "2.5"}, r"placement policy prefill_queue_threshold: 2.5 must be an integer"),
])
def test_bad_stored_values_are_refused_naming_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PlacementPolicy.from_redis(raw)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_local_prefill_tokens": -1}, "max_local_prefill_tokens: -1 must be a number >= 0"),
    ({"overlap_weight": None}, "overlap_weight: None must be a number >= 0"),
    ({"prefill_queue_threshold": True}, "prefill_queue_threshold: True must be a number >= 0"),
])
def test_construction_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PlacementPolicy(**kwargs)  # type: ignore[arg-type]
