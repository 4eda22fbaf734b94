"""The read planner: descriptor rows for every TP pairing, with exact addresses, split and replicated KV heads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.plan import block_rows, head_range, merged_descriptors, plan_reads
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


# ---- replicated KV heads (TP > KV heads): one replica is read, every local rank that needs a head reads it ----

def test_tp1_to_tp2_mqa_both_ranks_read_the_one_head_as_whole_blocks() -> None:
    remote = desc(0, 1, 0, heads=1, name="p")
    for rank, base in ((0, 10**6), (1, 2 * 10**6)):
        (plan,) = plan_reads(desc(rank, 2, base, heads=1), [remote], [0, 1, 5], [5, 6, 9])
        assert plan.remote.tp_rank == 0
        # A 1-head block is the whole block on both sides: adjacent ids coalesce.
        assert rows(plan.remote_rows) == [(5 * HEAD, 2 * HEAD), (9 * HEAD, HEAD)]
        assert rows(plan.local_rows) == [(base, 2 * HEAD), (base + 5 * HEAD, HEAD)]


def test_tp2_to_tp1_mqa_reads_one_replica_not_both() -> None:
    remotes = [desc(0, 2, 0, heads=1, name="p"), desc(1, 2, 10**7, heads=1, name="p")]
    (plan,) = plan_reads(desc(0, 1, 10**6, heads=1), remotes, [3, 4], [9, 10])
    assert plan.remote.tp_rank == 0
    assert rows(plan.remote_rows) == [(9 * HEAD, 2 * HEAD)]
    assert rows(plan.local_rows) == [(10**6 + 3 * HEAD, 2 * HEAD)]
    assert plan.num_bytes == 2 * HEAD  # two blocks of one head, once


def test_tp2_to_tp2_mqa_readers_spread_over_the_replicas() -> None:
    remotes = [desc(0, 2, 0, heads=1, name="p"), desc(1, 2, 10**7, heads=1, name="p")]
    (p0,) = plan_reads(desc(0, 2, 10**6, heads=1), remotes, [1], [2])
    (p1,) = plan_reads(desc(1, 2, 2 * 10**6, heads=1), remotes, [1], [2])
    assert (p0.remote.tp_rank, p1.remote.tp_rank) == (0, 1)
    assert rows(p0.remote_rows) == [(2 * HEAD, HEAD)] and rows(p1.remote_rows) == [(10**7 + 2 * HEAD, HEAD)]
    assert rows(p0.local_rows) == [(10**6 + HEAD, HEAD)] and rows(p1.local_rows) == [(2 * 10**6 + HEAD, HEAD)]


def test_tp2_to_tp4_with_two_kv_heads_each_pair_of_ranks_reads_its_heads_holder() -> None:
    remotes = [desc(0, 2, 0, heads=2, name="p"), desc(1, 2, 10**7, heads=2, name="p")]
    bases = [10**6, 2 * 10**6, 3 * 10**6, 4 * 10**6]
    got = []
    for rank, base in enumerate(bases):  # decode ranks 0, 1 hold head 0; ranks 2, 3 head 1
        (plan,) = plan_reads(desc(rank, 4, base, heads=2), remotes, [4, 5], [10, 11])
        got.append((plan.remote.tp_rank, rows(plan.remote_rows), rows(plan.local_rows)))
    assert got == [
        (0, [(10 * HEAD, 2 * HEAD)], [(10**6 + 4 * HEAD, 2 * HEAD)]),
        (0, [(10 * HEAD, 2 * HEAD)], [(2 * 10**6 + 4 * HEAD, 2 * HEAD)]),
        (1, [(10**7 + 10 * HEAD, 2 * HEAD)], [(3 * 10**6 + 4 * HEAD, 2 * HEAD)]),
        (1, [(10**7 + 10 * HEAD, 2 * HEAD)], [(4 * 10**6 + 4 * HEAD, 2 * HEAD)]),
    ]


def test_tp4_with_two_kv_heads_to_tp1_reads_each_head_from_one_replica() -> None:
    remotes = [desc(r, 4, r * 10**7, heads=2, name="p") for r in range(4)]  # heads 0, 0, 1, 1
    plans = plan_reads(desc(0, 1, 10**6, heads=2), remotes, [3], [9])
    assert [p.remote.tp_rank for p in plans] == [0, 2]
    assert rows(plans[0].remote_rows) == [(9 * HEAD, HEAD)]
    assert rows(plans[0].local_rows) == [(10**6 + 3 * 2 * HEAD, HEAD)]
    assert rows(plans[1].remote_rows) == [(2 * 10**7 + 9 * HEAD, HEAD)]
    assert rows(plans[1].local_rows) == [(10**6 + 3 * 2 * HEAD + HEAD, HEAD)]


def test_tp4_with_two_kv_heads_to_tp2_spreads_over_replicas() -> None:
    remotes = [desc(r, 4, r * 10**7, heads=2, name="p") for r in range(4)]
    (p0,) = plan_reads(desc(0, 2, 10**6, heads=2), remotes, [0], [0])  # head 0: replicas on ranks 0, 1
    (p1,) = plan_reads(desc(1, 2, 10**6, heads=2), remotes, [0], [0])  # head 1: replicas on ranks 2, 3
    assert (p0.remote.tp_rank, p1.remote.tp_rank) == (0, 3)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_every_local_head_is_read_exactly_once(heads: int, p: int, d: int) -> None:
    """Every TP pairing: each decode rank's bytes of a block are written exactly once, each from a prefill
    rank that holds that head."""
    remotes = [desc(r, p, r * 10**7, heads=heads, name="p") for r in range(p)]
    for rank in range(d):
        local = desc(rank, d, 10**6, heads=heads)
        written: list[int] = []  # global head of each local head slot written, in slot order
        for plan in plan_reads(local, remotes, [0], [0]):
            ((l_addr, length),), ((r_addr, _),) = rows(plan.local_rows), rows(plan.remote_rows)
            r_first = head_range(plan.remote)[0] + (r_addr - plan.remote.base_addr) // HEAD
            l_slot = (l_addr - local.base_addr) // HEAD
            assert r_first == head_range(local)[0] + l_slot  # the remote head lands in its own slot
            written += range(r_first, r_first + length // HEAD)
        assert sorted(written) == list(range(*head_range(local))), (rank, written)


def test_prepared_block_rows_hold_each_blocks_piece_by_block_id() -> None:
    """TP 1 -> 2, decode rank 1: row b of each list is the piece of block b (heads 2 and 3)."""
    remote, r1 = desc(0, 1, 0, name="p"), desc(1, 2, 10**6)
    local_rows, remote_rows = block_rows(r1, remote)
    assert local_rows.shape == remote_rows.shape == (64, 3)
    assert rows(local_rows[:2]) == [(10**6, 2 * HEAD), (10**6 + 2 * HEAD, 2 * HEAD)]
    assert rows(remote_rows[5:7]) == [(5 * 4 * HEAD + 2 * HEAD, 2 * HEAD), (6 * 4 * HEAD + 2 * HEAD, 2 * HEAD)]


def test_merged_descriptors_count_runs_only_for_whole_blocks() -> None:
    local, remote = desc(0, 1, 0), desc(0, 1, 10**6, name="p")
    ids = np.array([7, 8, 9, 20], dtype=np.int32)
    assert merged_descriptors(local, remote, ids, np.array([3, 4, 5, 6], dtype=np.int32)) == 2
    assert merged_descriptors(local, remote, ids, np.array([3, 4, 9, 10], dtype=np.int32)) == 3
    half = desc(1, 2, 0)  # a head half of each block: pieces of adjacent blocks are not adjacent in memory
    assert merged_descriptors(half, remote, ids, np.array([3, 4, 5, 6], dtype=np.int32)) == 4


def reference_rows(local: AgentDescriptor, remote: AgentDescriptor, lbs: list[int], rbs: list[int], groups: range,
                   max_run: int) -> list[tuple[int, ...]]:
    """(local addr, remote addr, bytes) per descriptor, block by block: what plan_reads' numpy must equal."""
    lo, hi = head_range(local)
    r_lo, r_hi = head_range(remote)
    g0, g1 = max(lo, r_lo), min(hi, r_hi)
    size, whole = (g1 - g0) * HEAD, (g1 - g0) * HEAD == local.block_bytes == remote.block_bytes
    out: list[list[int]] = []
    for g in groups:
        last = None
        for lb, rb in zip(lbs, rbs, strict=True):
            la = local.base_addr + (g0 - lo) * HEAD + (g * local.num_blocks + lb) * local.block_bytes
            ra = remote.base_addr + (g0 - r_lo) * HEAD + (g * remote.num_blocks + rb) * remote.block_bytes
            if whole and last is not None and last[2] < max_run * size and last[0] + last[2] == la and \
                    last[1] + last[2] == ra:
                last[2] += size
            else:
                last = [la, ra, size]
                out.append(last)
    return [tuple(r) for r in out]


@pytest.mark.parametrize("seed", range(6))
def test_plan_reads_equals_a_block_by_block_plan(seed: int) -> None:
    """Random block lists (runs and gaps), layer groups, descriptor caps and TP pairings."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    lbs = np.cumsum(rng.choice([1, 1, 1, 2, 7], n)).tolist()
    rbs = (np.cumsum(rng.choice([1, 1, 1, 3], n)) + int(rng.integers(0, 5))).tolist()
    lbs, rbs = [b % 64 for b in lbs], [b % 64 for b in rbs]
    local_tp, remote_tp = [(1, 1), (2, 1), (1, 2), (4, 2)][seed % 4]
    num_groups = [1, 2, 4][seed % 3]
    local = dataclasses.replace(desc(local_tp - 1, local_tp, 10**7), num_layer_groups=num_groups)
    remotes = [dataclasses.replace(desc(r, remote_tp, 10**9 * (r + 1), name="p"), num_layer_groups=num_groups)
               for r in range(remote_tp)]
    max_run = int(rng.choice([1, 2, 3, 1000]))
    groups = range(int(rng.integers(0, num_groups)), num_groups)
    plans = plan_reads(local, remotes, lbs, rbs, max_run * local.block_bytes, groups)
    assert plans
    for plan in plans:
        got = [(int(a[0]), int(b[0]), int(a[1])) for a, b in zip(plan.local_rows, plan.remote_rows, strict=True)]
        assert got == reference_rows(local, plan.remote, lbs, rbs, groups, max_run)


def test_a_run_stops_at_its_layer_group_even_where_memory_goes_on() -> None:
    """Every block of a 2-group cache: group 0's last block and group 1's first are adjacent bytes on both sides,
    but a read's descriptors stay one group each (a streamed read may cover one group only)."""
    local = dataclasses.replace(desc(0, 1, 0), num_layer_groups=2)
    remote = dataclasses.replace(desc(0, 1, 10**7, name="p"), num_layer_groups=2)
    (plan,) = plan_reads(local, [remote], list(range(64)), list(range(64)))
    assert rows(plan.local_rows) == [(0, 64 * 4 * HEAD), (64 * 4 * HEAD, 64 * 4 * HEAD)]
    assert rows(plan.local_rows) == [(a - 10**7, n) for a, n in rows(plan.remote_rows)]
