"""Which bytes to read: from (remote block ids, local block ids) to NIXL descriptor rows per remote rank.

Rank r of a TP-t side with H KV heads holds the global heads `engine.kv_heads.KVHeadSplit(H, t, r).heads`:
[r·H/t, (r+1)·H/t) when t divides H, or the single head r // (t/H) when t is a multiple of H (then t/H ranks
hold identical replicas of it). The reader pulls each of its heads exactly once: from the one remote rank that
holds it, or, when the remote side replicates it, from one replica only, chosen by the reader's rank (readers
spread over the replicas). In the cache layout (docs/kv-layout.md) a head range inside a block of one layer
group is one contiguous piece, and when the piece is the whole block on both sides, runs of consecutive block ids
on both sides coalesce into one descriptor per group. A read names the layer groups it covers (all, or the ones
a streaming prefill has finished).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from engine.kv_heads import KVHeadSplit
from kv_transfer.descriptor import AgentDescriptor


@dataclass
class RankRead:
    remote: AgentDescriptor
    local_rows: np.ndarray  # [n, 3] uint64: (addr, length, device id) in this rank's KV allocation
    remote_rows: np.ndarray  # [n, 3] uint64: the matching ranges in the remote rank's allocation

    @property
    def num_bytes(self) -> int:
        return int(self.local_rows[:, 1].sum())


def head_range(desc: AgentDescriptor) -> tuple[int, int]:
    """[first, end) of the global KV heads the rank of `desc` holds."""
    return _head_range(desc.total_kv_heads, desc.tp_size, desc.tp_rank)


@functools.lru_cache(maxsize=1024)
def _head_range(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    heads = KVHeadSplit(total_kv_heads, tp_size, tp_rank).heads
    return heads.start, heads.stop


def sources(local: AgentDescriptor, remotes: list[AgentDescriptor]) -> list[AgentDescriptor]:
    """The remote ranks this rank reads from, in rank order: one holder per distinct head range that overlaps
    its own. Replicas of a range (a remote side at TP > its KV heads) are interchangeable; reader rank r takes
    replica r mod (number of replicas), so the readers of one head spread over its copies, and no head is read
    twice into one rank."""
    lo, hi = head_range(local)
    holders: dict[tuple[int, int], list[AgentDescriptor]] = {}
    for remote in sorted(remotes, key=lambda d: d.tp_rank):
        r_lo, r_hi = head_range(remote)
        if max(lo, r_lo) < min(hi, r_hi):
            holders.setdefault((r_lo, r_hi), []).append(remote)
    chosen = [replicas[local.tp_rank % len(replicas)] for replicas in holders.values()]
    return sorted(chosen, key=lambda d: d.tp_rank)


@dataclass(frozen=True)
class Piece:
    """The bytes of one block that a reader rank copies from one source rank: `size` bytes at `local_offset`
    inside each local block and `remote_offset` inside each remote block (the heads both ranks hold)."""

    size: int
    local_offset: int
    remote_offset: int


def piece(local: AgentDescriptor, remote: AgentDescriptor) -> Piece:
    lo, hi = head_range(local)
    r_lo, r_hi = head_range(remote)
    g0, g1 = max(lo, r_lo), min(hi, r_hi)
    return Piece((g1 - g0) * local.head_bytes, (g0 - lo) * local.head_bytes, (g0 - r_lo) * remote.head_bytes)


def whole_blocks(local: AgentDescriptor, remote: AgentDescriptor) -> bool:
    """Whether this rank reads the remote's blocks whole (the same heads on both sides, the same block bytes)."""
    return piece(local, remote).size == local.block_bytes == remote.block_bytes


def all_groups(desc: AgentDescriptor) -> range:
    return range(desc.num_layer_groups)


def block_rows(local: AgentDescriptor, remote: AgentDescriptor) -> tuple[np.ndarray, np.ndarray]:
    """The piece of every (layer group, block), as NIXL descriptor rows: ([G·local.num_blocks, 3],
    [G·remote.num_blocks, 3]) uint64 (addr, length, device id); row g·num_blocks + b is group g of block b, the
    order of memory. Prepared once per peer, a read then names row indices only (`unit_indices`)."""
    p = piece(local, remote)

    def rows(desc: AgentDescriptor, offset: int) -> np.ndarray:
        n = desc.num_layer_groups * desc.num_blocks
        out = np.empty((n, 3), dtype=np.uint64)  # [G·num_blocks, 3]
        out[:, 0] = np.uint64(desc.base_addr + offset) + np.arange(n, dtype=np.uint64) * np.uint64(desc.block_bytes)
        out[:, 1] = p.size
        out[:, 2] = desc.device_id
        return out

    return rows(local, p.local_offset), rows(remote, p.remote_offset)


def unit_indices(desc: AgentDescriptor, blocks: np.ndarray, groups: range) -> np.ndarray:
    """Rows of `block_rows` for `blocks` [n] in each of `groups`, group by group: [len(groups)·n] int32."""
    g = np.asarray(groups, dtype=np.int64)[:, None]  # [len(groups), 1]
    return (g * desc.num_blocks + blocks.astype(np.int64)[None, :]).reshape(-1).astype(np.int32)


def merged_descriptors(local: AgentDescriptor, remote: AgentDescriptor, local_idx: np.ndarray,
                       remote_idx: np.ndarray) -> int:
    """How many descriptors a read by block index amounts to once adjacent ones merge (NIXL merges rows that
    are adjacent on both sides): runs of consecutive ids on both sides when the piece is the whole block,
    else one per block."""
    n = len(local_idx)
    # NOTE: indices are rows of `block_rows`, in memory order, so consecutive ones are adjacent bytes
    if n == 0 or not whole_blocks(local, remote):
        return n
    breaks = (np.diff(local_idx) != 1) | (np.diff(remote_idx) != 1)  # [n - 1]
    return 1 + int(breaks.sum())


def plan_reads(local: AgentDescriptor, remotes: list[AgentDescriptor], local_blocks: list[int],
               remote_blocks: list[int], max_descriptor_bytes: int = 1 << 62,
               groups: range | None = None) -> list[RankRead]:
    """Descriptor rows that copy remote_blocks[i] into local_blocks[i] for this rank's heads, in each layer group
    of `groups` (None: all). Coalesced runs (within a group) are cut at `max_descriptor_bytes` (whole blocks; a
    single block is never split). NOTE: numpy throughout, no loop over blocks: it is on the read's critical
    path (a 512 MB read is 256 blocks of 4 groups)."""
    assert len(local_blocks) == len(remote_blocks)
    groups = all_groups(local) if groups is None else groups
    lb, rb = np.asarray(local_blocks, dtype=np.int64), np.asarray(remote_blocks, dtype=np.int64)  # [n]
    li = unit_indices(local, lb, groups).astype(np.int64)  # [len(groups)·n] rows of block_rows, group-major
    plans: list[RankRead] = []
    for remote in sources(local, remotes):
        p = piece(local, remote)
        whole = p.size == local.block_bytes == remote.block_bytes
        ri = unit_indices(remote, rb, groups).astype(np.int64)  # [len(groups)·n]
        max_run = max(1, max_descriptor_bytes // local.block_bytes) if whole else 1
        starts, lengths = _runs(li, ri, len(lb), max_run)  # [runs], [runs]
        n = len(starts)
        local_rows = np.empty((n, 3), dtype=np.uint64)  # [runs, 3]
        remote_rows = np.empty((n, 3), dtype=np.uint64)  # [runs, 3]
        local_rows[:, 0] = np.uint64(local.base_addr + p.local_offset) + \
            li[starts].astype(np.uint64) * np.uint64(local.block_bytes)
        remote_rows[:, 0] = np.uint64(remote.base_addr + p.remote_offset) + \
            ri[starts].astype(np.uint64) * np.uint64(remote.block_bytes)
        local_rows[:, 1] = remote_rows[:, 1] = lengths.astype(np.uint64) * np.uint64(p.size)
        local_rows[:, 2] = local.device_id
        remote_rows[:, 2] = remote.device_id
        plans.append(RankRead(remote, local_rows, remote_rows))
    return plans


def _runs(li: np.ndarray, ri: np.ndarray, per_group: int, max_run: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of units consecutive on both sides, within one group (`per_group` units each), of at most `max_run`:
    (index of each run's first unit in li/ri [runs], its length [runs])."""
    n = len(li)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if max_run == 1:
        return np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    cut = (li[1:] - li[:-1] != 1) | (ri[1:] - ri[:-1] != 1)  # [n - 1]
    if per_group:
        cut[per_group - 1::per_group] = True  # NOTE: a run never crosses into the next group
    starts = np.concatenate(([0], np.flatnonzero(cut) + 1))  # [runs]
    lengths = np.concatenate((starts[1:], [n])) - starts  # [runs]
    if lengths.max() > max_run:  # cut long runs into max_run pieces
        pieces = -(-lengths // max_run)  # [runs]
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)  # [pieces]: index of its run's first piece
        offset = (np.arange(int(pieces.sum())) - first) * max_run  # [pieces]
        ends = np.repeat(starts + lengths, pieces)  # [pieces]
        starts = np.repeat(starts, pieces) + offset
        lengths = np.minimum(max_run, ends - starts)
    return starts, lengths
