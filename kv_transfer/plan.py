"""Which bytes to read: from (remote block ids, local block ids) to NIXL descriptor rows per remote rank.

Rank r of a TP-d reader holds global KV heads [r·H/d, (r+1)·H/d); rank q of a TP-p writer holds
[q·H/p, (q+1)·H/p). The reader pulls the intersection from every writer rank that overlaps it. In the cache
layout (docs/kv-layout.md) a head range inside a block is one contiguous piece, and when the piece is the whole
block on both sides, runs of consecutive block ids on both sides coalesce into one descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    return desc.tp_rank * desc.num_kv_heads, (desc.tp_rank + 1) * desc.num_kv_heads


def plan_reads(local: AgentDescriptor, remotes: list[AgentDescriptor], local_blocks: list[int],
               remote_blocks: list[int], max_descriptor_bytes: int = 1 << 62) -> list[RankRead]:
    """Descriptor rows that copy remote_blocks[i] into local_blocks[i] for this rank's heads. Coalesced runs
    are cut at `max_descriptor_bytes` (whole blocks; a single block is never split)."""
    assert len(local_blocks) == len(remote_blocks)
    lo, hi = head_range(local)
    plans: list[RankRead] = []
    for remote in remotes:
        r_lo, r_hi = head_range(remote)
        g0, g1 = max(lo, r_lo), min(hi, r_hi)
        if g0 >= g1:
            continue
        piece = (g1 - g0) * local.head_bytes
        l_off = (g0 - lo) * local.head_bytes
        r_off = (g0 - r_lo) * remote.head_bytes
        whole = piece == local.block_bytes == remote.block_bytes
        max_run = max(1, max_descriptor_bytes // local.block_bytes) if whole else 1
        runs = _runs(local_blocks, remote_blocks, max_run)
        n = len(runs)
        arr = np.asarray(runs, dtype=np.uint64).reshape(n, 3)
        local_rows = np.empty((n, 3), dtype=np.uint64)
        remote_rows = np.empty((n, 3), dtype=np.uint64)
        local_rows[:, 0] = np.uint64(local.base_addr + l_off) + arr[:, 0] * np.uint64(local.block_bytes)
        remote_rows[:, 0] = np.uint64(remote.base_addr + r_off) + arr[:, 1] * np.uint64(remote.block_bytes)
        local_rows[:, 1] = remote_rows[:, 1] = arr[:, 2] * np.uint64(piece)
        local_rows[:, 2] = local.device_id
        remote_rows[:, 2] = remote.device_id
        plans.append(RankRead(remote, local_rows, remote_rows))
    return plans


def _runs(local_blocks: list[int], remote_blocks: list[int], max_run: int) -> list[tuple[int, int, int]]:
    """Runs (local, remote, length) of at most `max_run` blocks where both sides' ids are consecutive."""
    runs: list[list[int]] = []
    for lb, rb in zip(local_blocks, remote_blocks, strict=True):
        if runs and runs[-1][2] < max_run and runs[-1][0] + runs[-1][2] == lb and runs[-1][1] + runs[-1][2] == rb:
            runs[-1][2] += 1
        else:
            runs.append([lb, rb, 1])
    return [(a, b, c) for a, b, c in runs]
