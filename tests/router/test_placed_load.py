"""The router's own load records: exact counts per instance through placing, re-placing, a finished prefill
and the end of a request."""

from __future__ import annotations

from router.placed_load import PlacedLoad
from router.placement import Placement


def test_counts_follow_a_request_through_a_move_and_its_end() -> None:
    load = PlacedLoad()
    remote = Placement("d0", "p0", 16, 84, "remote")
    load.placed("r1", remote, None)
    load.placed("r2", Placement("d0", None, 0, 20, "local"), None)
    assert load.requests_on == {"d0": 2, "p0": 1} and load.pending_on == {"p0": 84, "d0": 20}
    load.placed("r1", Placement("d0", "p1", 16, 84, "retried"), remote)  # the prefill moved to p1
    assert load.requests_on == {"d0": 2, "p1": 1} and load.pending_on == {"p1": 84, "d0": 20}
    load.prefill_finished("r1")
    load.prefill_finished("r1")  # twice: counted once
    assert load.pending_on == {"d0": 20} and load.prefill_pending == {"r2": ("d0", 20)}
    load.finished("r2", Placement("d0", None, 0, 20, "local"))
    load.finished("r1", Placement("d0", "p1", 16, 84, "retried"))
    assert load.requests_on == {} and load.pending_on == {} and load.prefill_pending == {}
