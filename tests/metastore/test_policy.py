"""PlacementPolicy: construction validates every field, and the Redis form round-trips, overrides a base and
refuses unknown keys and non-numbers naming the key."""

from __future__ import annotations

import pytest

from metastore import PlacementPolicy


def test_policy_rejects_a_fractional_token_threshold() -> None:
    with pytest.raises(ValueError, match="max_prefill_queue_tokens"):
        PlacementPolicy(max_prefill_queue_tokens=1.5)  # type: ignore[arg-type]
