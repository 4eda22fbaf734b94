"""Which KV heads each tensor-parallel rank holds: split when the TP size divides the KV heads, replicated when
it is a multiple of them (docs/kv-layout.md).

    H KV heads, TP size t:
      t <= H (t divides H):  rank r holds heads [r·H/t, (r+1)·H/t)           (H/t heads, no copies)
      t >  H (H divides t):  rank r holds head  r // (t/H)                    (1 head, t/H identical replicas)

Both cases are `first = r·H // t` with `count = max(1, H // t)`. The model (its K/V projection rows), the KV
cache (its head count) and the KV transfer planner (which remote rank holds a head) all take their numbers from
here, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


def check_kv_head_split(num_kv_heads: int, tp_size: int) -> None:
    """ValueError naming both numbers unless `tp_size` divides `num_kv_heads` or is a multiple of it."""
    if num_kv_heads <= 0 or tp_size <= 0 or (num_kv_heads % tp_size and tp_size % num_kv_heads):
        raise ValueError(
            f"tensor_parallel_size: {tp_size} neither divides nor is a multiple of the model's "
            f"num_key_value_heads ({num_kv_heads}); KV heads are split over ranks when it divides them and "
            "replicated when it is a multiple of them"
        )


@dataclass(frozen=True)
class KVHeadSplit:
    """The KV heads of one rank of a TP group. Construction checks the split (check_kv_head_split)."""

    total: int  # the model's num_key_value_heads
    tp_size: int
    tp_rank: int

    def __post_init__(self) -> None:
        check_kv_head_split(self.total, self.tp_size)
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside [0, {self.tp_size})")

    @property
    def replicas(self) -> int:
        """Ranks holding each KV head (1: split, no copies)."""
        return max(1, self.tp_size // self.total)

    @property
    def count(self) -> int:
        """KV heads on this rank."""
        return max(1, self.total // self.tp_size)

    @property
    def first(self) -> int:
        """The global index of this rank's first KV head."""
        # NOTE: r·H // t is r·(H/t) when t divides H, and r // (t/H) when H divides t.
        return self.tp_rank * self.total // self.tp_size

    @property
    def heads(self) -> range:
        """Global indices of this rank's KV heads."""
        return range(self.first, self.first + self.count)
