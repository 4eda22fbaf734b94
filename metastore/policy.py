"""Placement parameters an operator can change at runtime (stored in Redis; the router re-reads them)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class PlacementPolicy:
    # Conditional disaggregation: prefill on the decode instance when the prompt tokens it lacks are few...
    max_local_prefill_tokens: int = 256
    # ...or when the prefill pool is saturated (every prefill instance has at least this many waiting)...
    prefill_queue_threshold: int = 8
    # ...or when every prefill instance has at least this many prompt tokens queued ahead of a new prompt and
    # the decode instance has fewer (0: off). Tokens predict the wait where request counts do not.
    max_prefill_queue_tokens: int = 0
    # Cost of a candidate instance = load_weight * load - overlap_weight * (cached prompt fraction).
    overlap_weight: float = 1.0
    load_weight: float = 1.0
    # Load of an instance = waiting + running requests (normalised by max_num_seqs) + kv_weight * KV usage.
    kv_weight: float = 0.5
    # A block that prompts have continued with at least this many different next blocks is a shared prefix (a
    # system prompt): its cached copies earn no affinity credit, so new conversations spread (0: off).
    shared_prefix_fanout: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"placement policy {f.name}: {value!r} must be a number >= 0")
        for name in ("max_local_prefill_tokens", "prefill_queue_threshold", "max_prefill_queue_tokens",
                     "shared_prefix_fanout"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"placement policy {name}: {getattr(self, name)!r} must be an integer")

    def to_redis(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @staticmethod
    def from_redis(raw: dict[bytes | str, bytes | str], base: PlacementPolicy | None = None) -> PlacementPolicy:
        """Values stored in Redis override `base`; unknown keys and bad values raise ValueError naming the key."""
        known = {f.name: f for f in fields(PlacementPolicy)}
        values: dict[str, Any] = asdict(base or PlacementPolicy())
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else k
            if key not in known:
                raise ValueError(f"placement policy: unknown key {key!r}; known: {', '.join(known)}")
            try:
                values[key] = json.loads(v)
            except json.JSONDecodeError:
                raise ValueError(f"placement policy {key}: {v!r} is not a number") from None
        return PlacementPolicy(**values)
