"""Posting a rank's READs through NIXL, and the record of a read in flight.

`TransferAgent` (kv_transfer/agent.py) decides where each holder's blocks come from (a same-host mapping,
kv_transfer/local_copy.py, or NIXL); this file posts the NIXL part: by block index from descriptor lists
prepared once per peer (`prep_xfer_dlist` / `make_prepped_xfer`, no list built per read), or from descriptor
rows built for the read (`plan_reads`), split over a few transfer handles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.local_copy import LocalRead
from kv_transfer.plan import block_rows, merged_descriptors, plan_reads, sources, unit_indices
from kv_transfer.read_state import IN_FLIGHT, ReadState


@dataclass
class InFlightRead:
    """One read of a rank, from its posting to `TransferAgent.finish`."""

    handles: list[Any]  # NIXL transfer handles
    deadline: float  # time.monotonic() past which it fails with TransferTimeoutError
    num_bytes: int
    num_descs: int
    state: ReadState = IN_FLIGHT
    events: list[Any] = field(default_factory=list)  # ends of its local copies (kv_transfer/local_copy.py)
    local_bytes: int = 0
    local_copy_fallbacks: int = 0
    new_peers: list[AgentDescriptor] = field(default_factory=list)  # whose read transports get logged when done

    def add_local(self, done: LocalRead) -> None:
        self.events += done.events
        self.num_bytes += done.num_bytes
        self.local_bytes += done.num_bytes
        self.num_descs += done.pieces
        self.local_copy_fallbacks += done.fallbacks


@dataclass(frozen=True)
class PreparedPeer:
    local: Any  # NIXL prepared descriptor list: row b = the piece of this rank's block b
    remote: Any  # the same for the peer's blocks
    piece_bytes: int  # bytes per block read from this peer (its heads that this rank holds)


class NixlReads:
    """The NIXL side of one rank's reads: its agent, its descriptor, and the lists prepared per peer."""

    def __init__(self, agent: Any, local: AgentDescriptor, cfg: TransferConfig,
                 peer_name: Callable[[AgentDescriptor], str]) -> None:
        """`peer_name`: the NIXL name of a remote agent, loading its metadata on first use."""
        self.agent, self.local, self.cfg, self.peer_name = agent, local, cfg, peer_name
        self.prepared: dict[str, PreparedPeer] = {}  # agent_name -> its lists, prepared on the first read

    def post(self, read: InFlightRead, descs: list[AgentDescriptor], local_blocks: list[int],
             remote_blocks: list[int], groups: range) -> None:
        """Post READs of remote_blocks (from the holders `descs`, one per head range) into local_blocks."""
        if self.cfg.prepared_descriptors:
            self._post_prepared(read, descs, local_blocks, remote_blocks, groups)
            return
        for plan in plan_reads(self.local, descs, local_blocks, remote_blocks, self.cfg.max_descriptor_bytes,
                               groups):
            peer = self.peer_name(plan.remote)
            read.num_bytes += plan.num_bytes
            read.num_descs += len(plan.local_rows)
            for i, j in self._chunks(len(plan.local_rows)):
                local = self.agent.get_xfer_descs(plan.local_rows[i:j], self.local.mem_type)
                remote = self.agent.get_xfer_descs(plan.remote_rows[i:j], plan.remote.mem_type)
                self._start(read, self.agent.initialize_xfer("READ", local, remote, peer, b""))

    def _post_prepared(self, read: InFlightRead, descs: list[AgentDescriptor], local_blocks: list[int],
                       remote_blocks: list[int], groups: range) -> None:
        """Reads by (group, block) index: no descriptor list is built per read (issue 20's posting cost)."""
        local_idx = unit_indices(self.local, np.asarray(local_blocks), groups)  # [len(groups) · n]
        for remote in sources(self.local, descs):
            remote_idx = unit_indices(remote, np.asarray(remote_blocks), groups)  # [len(groups) · n]
            lists = self._prepared_lists(remote)
            read.num_bytes += lists.piece_bytes * len(local_idx)
            read.num_descs += merged_descriptors(self.local, remote, local_idx, remote_idx)
            for i, j in self._chunks(len(local_idx)):
                self._start(read, self.agent.make_prepped_xfer("READ", lists.local, local_idx[i:j], lists.remote,
                                                               remote_idx[i:j], b""))

    def _prepared_lists(self, remote: AgentDescriptor) -> PreparedPeer:
        """This rank's and `remote`'s descriptor lists of every block's piece (prepared once per peer)."""
        lists = self.prepared.get(remote.agent_name)
        if lists is None:
            peer = self.peer_name(remote)
            local_rows, remote_rows = block_rows(self.local, remote)  # [G · blocks, 3] each
            lists = PreparedPeer(self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local_rows, self.local.mem_type),
                                 self.agent.prep_xfer_dlist(peer, remote_rows, remote.mem_type),
                                 int(local_rows[0, 1]))
            self.prepared[remote.agent_name] = lists
        return lists

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """[i, j) ranges splitting n rows over the configured number of NIXL transfers. Several handles posted
        back to back keep more copies in flight than one long list (measured on H200s: 266 vs 221 GB/s for
        512 MB with 4 handles; docs/performance.md)."""
        k = self.cfg.parallel_handles or (4 if self.local.mem_type == "VRAM" else 1)
        step = -(-n // max(1, min(k, n)))
        return [(i, min(n, i + step)) for i in range(0, n, step)]

    def _start(self, read: InFlightRead, handle: Any) -> None:
        read.handles.append(handle)
        if self.agent.transfer(handle) == "ERR":
            raise RuntimeError("transfer() returned ERR")

    def release_lists(self) -> list[Exception]:
        """Release every prepared list; returns the failures (the caller logs them)."""
        failures: list[Exception] = []
        for lists in self.prepared.values():
            for handle in (lists.local, lists.remote):
                try:
                    self.agent.release_dlist_handle(handle)
                except Exception as e:
                    failures.append(e)
        self.prepared = {}
        return failures
