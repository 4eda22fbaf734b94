"""The read planner: descriptor rows for every TP pairing, with exact addresses."""

from __future__ import annotations

import numpy as np

from kv_transfer.plan import plan_reads
from tests.kv_transfer.conftest import HEAD, desc


def rows(a: np.ndarray) -> list[tuple[int, int]]:
    return [(int(x), int(n)) for x, n, _ in a]


def test_equal_tp_coalesces_runs_of_adjacent_blocks() -> None:
    local, remote = desc(0, 1, 10**6), desc(0, 1, 5 * 10**6, name="p")
    (plan,) = plan_reads(local, [remote], [7, 8, 9, 20], [3, 4, 5, 6])
    block = 4 * HEAD
    assert rows(plan.local_rows) == [(10**6 + 7 * block, 3 * block), (10**6 + 20 * block, block)]
    assert rows(plan.remote_rows) == [(5 * 10**6 + 3 * block, 3 * block), (5 * 10**6 + 6 * block, block)]
    assert plan.num_bytes == 4 * block


def test_coalesced_runs_are_cut_at_the_descriptor_cap() -> None:
    local, remote = desc(0, 1, 0), desc(0, 1, 10**6, name="p")
    (plan,) = plan_reads(local, [remote], list(range(5)), list(range(10, 15)), max_descriptor_bytes=2 * 4 * HEAD)
    assert [n for _, n in rows(plan.local_rows)] == [8 * HEAD, 8 * HEAD, 4 * HEAD]


def test_tp1_to_tp2_reads_each_ranks_head_half_one_piece_per_block() -> None:
    remote = desc(0, 1, 0, name="p")
    r1 = desc(1, 2, 10**6)
    (plan,) = plan_reads(r1, [remote], [0, 1], [5, 6])
    # Decode rank 1 holds heads 2, 3: at head offset 2 of each 4-head prefill block, 2 heads long.
    assert rows(plan.remote_rows) == [(5 * 4 * HEAD + 2 * HEAD, 2 * HEAD), (6 * 4 * HEAD + 2 * HEAD, 2 * HEAD)]
    assert rows(plan.local_rows) == [(10**6, 2 * HEAD), (10**6 + 2 * HEAD, 2 * HEAD)]


def test_tp2_to_tp1_reads_every_prefill_rank_into_its_head_offset() -> None:
    remotes = [desc(0, 2, 0, name="p"), desc(1, 2, 10**7, name="p")]
    local = desc(0, 1, 10**6)
    plans = plan_reads(local, remotes, [3], [9])
    assert [p.remote.tp_rank for p in plans] == [0, 1]
    assert rows(plans[0].remote_rows) == [(9 * 2 * HEAD, 2 * HEAD)]
    assert rows(plans[0].local_rows) == [(10**6 + 3 * 4 * HEAD, 2 * HEAD)]
    assert rows(plans[1].remote_rows) == [(10**7 + 9 * 2 * HEAD, 2 * HEAD)]
    assert rows(plans[1].local_rows) == [(10**6 + 3 * 4 * HEAD + 2 * HEAD, 2 * HEAD)]


def test_tp2_to_tp4_picks_the_single_overlapping_rank() -> None:
    remotes = [desc(0, 2, 0, heads=8, name="p"), desc(1, 2, 10**7, heads=8, name="p")]
    local = desc(2, 4, 10**6, heads=8)  # heads 4, 5 live on prefill rank 1, at its head offset 0
    (plan,) = plan_reads(local, remotes, [1], [2])
    assert plan.remote.tp_rank == 1
    assert rows(plan.remote_rows) == [(10**7 + 2 * 4 * HEAD, 2 * HEAD)]
