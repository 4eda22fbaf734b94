"""Same-host reads without UCX: the reader maps the holder's KV allocation and copies the bytes itself.

UCX's same-host transports copy slower than the hardware allows: cma (DRAM) with one `process_vm_readv` call in the
posting thread, at 0.55-0.65x of a plain memcpy, and cuda_ipc (VRAM) on one CUDA stream per peer, at 0.6-0.7x of
a GPU-to-GPU copy (docs/performance.md). So each agent publishes how a same-host reader may map its KV
(`AgentDescriptor.share`):

  - "memfd:PID:FD" on CPU: the cache lives in a memfd (engine/kv_cache.py), mapped read-only through
    /proc/PID/fd/FD and copied with memcpy (numpy slice assignment, in 2 MiB pieces);
  - "cudaipc:B64" on GPU: the CUDA IPC handle of the cache's allocation (what torch shares tensors between
    processes with), opened in the reader's device context (peer access over NVLink) and copied on a stream of
    the reader's own by kv_transfer/gpu_copy.py (a driver copy per run, or one gather kernel); the read is done
    when that stream's event is.

With `kv_transfer.local_copy` on (by default on GPU), a reader on the same host reads such a peer this way. The
control messages (release, acknowledgement, streaming) still go over NIXL, and a peer that cannot be mapped
(another host, its process gone, a driver that refuses) is read over NIXL as before, with a warning and a count
(`unavailable`, and the read's `local_copy_fallbacks`).
"""

from __future__ import annotations

import base64
import json
import logging
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch

from kv_transfer.descriptor import AgentDescriptor, same_node
from kv_transfer.gpu_copy import (
    IndexSlots,
    block_runs,
    copy_bytes,
    gather_units,
    gathers,
    warm_gather,
)
from kv_transfer.plan import RankRead, plan_reads, whole_blocks

log = logging.getLogger(__name__)

COPY_CHUNK = 2 << 20  # CPU: 2 MiB pieces stay in cache better than one long copy (measured: docs/performance.md)
unavailable = 0  # same-host peers that could not be mapped (read over NIXL instead), in this process


def share_of(kv_tensor: torch.Tensor, memfd: int, pid: int) -> str:
    """How a same-host reader may map this cache ("" when it cannot)."""
    if memfd >= 0:
        return f"memfd:{pid}:{memfd}"
    if kv_tensor.is_cuda:
        try:
            _dev, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = (
                kv_tensor.untyped_storage()._share_cuda_())
        except RuntimeError as e:  # NOTE: e.g. an allocator without IPC (expandable segments): NIXL only
            log.info("KV cache not shareable by CUDA IPC (%s): same-host readers go through NIXL", e)
            return ""
        b64 = lambda b: base64.b64encode(b or b"").decode()  # noqa: E731
        return "cudaipc:" + base64.b64encode(json.dumps({
            "handle": b64(handle), "size": int(size), "offset": int(offset), "rc_handle": b64(rc_handle),
            "rc_offset": int(rc_offset), "ev_handle": b64(ev_handle), "ev_sync": bool(ev_sync)}).encode()).decode()
    return ""


class LocalRead(NamedTuple):
    """What one read of a mapped peer started."""

    events: list[Any]  # CUDA events to wait for (none on CPU: done on return)
    num_bytes: int
    pieces: int  # copies or gathers it amounts to
    fallbacks: int  # of them, those that went a slower way (kv_transfer/gpu_copy.py)


class LocalPeer:
    """A same-host holder's KV allocation, mapped for reading (`memory`: [its total bytes] uint8), and how this
    rank (`local`, its cache `local_bytes`: [bytes] uint8, numpy on CPU) copies from it."""

    def __init__(self, local: AgentDescriptor, local_bytes: Any, desc: AgentDescriptor,
                 local_device: torch.device) -> None:
        kind, _, rest = desc.share.partition(":")
        size = desc.num_layer_groups * desc.num_blocks * desc.block_bytes
        self.local, self.remote, self.local_bytes = local, desc, local_bytes
        self.base = desc.base_addr
        self.stream: Any = None
        if kind == "memfd" and desc.mem_type == "DRAM" and local_device.type == "cpu":
            pid, _, fd = rest.partition(":")
            if not (pid.isdigit() and fd.isdigit()):
                raise ValueError(f"{desc.agent_name}: malformed share {desc.share!r}")
            self.memory: Any = np.memmap(f"/proc/{int(pid)}/fd/{int(fd)}", dtype=np.uint8, mode="r", shape=(size,))
        elif kind == "cudaipc" and desc.mem_type == "VRAM" and local_device.type == "cuda":
            d = json.loads(base64.b64decode(rest))
            raw = lambda k: base64.b64decode(d[k]) or None  # noqa: E731
            # NOTE: opened in this process's device context: the pointer reaches the peer's memory over NVLink
            storage = torch.UntypedStorage._new_shared_cuda(
                local_device.index or 0, raw("handle"), int(d["size"]), int(d["offset"]), raw("rc_handle"),
                int(d["rc_offset"]), raw("ev_handle"), bool(d["ev_sync"]))
            if storage.nbytes() < size:
                raise ValueError(f"{desc.agent_name}: shared {storage.nbytes()} bytes, its KV has {size}")
            self.memory = torch.empty(0, dtype=torch.uint8, device=local_device).set_(storage, 0, (size,), (1,))
            self.stream = torch.cuda.Stream(local_device)
            self.device_index = local_device.index or 0
            self.index_slots = IndexSlots(local_device)
            warm_gather(self.stream, local_device, desc.block_bytes)
        else:
            raise ValueError(f"{desc.agent_name} shares no memory this {local_device.type} reader can map "
                             f"({kind or 'none'}, {desc.mem_type})")
        # GPU, both sides' units whole (same heads): reads go by `read_units`, without a plan
        self.whole_units = self.stream is not None and whole_blocks(local, desc)

    def read(self, local_blocks: list[int], remote_blocks: list[int], groups: range) -> LocalRead:
        """Copy remote_blocks of the peer into local_blocks of this rank, in the layer groups `groups`."""
        if self.whole_units:
            return self.read_units(local_blocks, remote_blocks, groups)
        events, num_bytes, num_descs = [], 0, 0
        for plan in plan_reads(self.local, [self.remote], local_blocks, remote_blocks, 1 << 62, groups):
            event = self.copy(plan)  # CPU: done on return
            if event is not None:
                events.append(event)
            num_bytes += plan.num_bytes
            num_descs += len(plan.local_rows)
        return LocalRead(events, num_bytes, num_descs, 0)

    def read_units(self, local_blocks: list[int], remote_blocks: list[int], groups: range) -> LocalRead:
        """GPU, whole units: a copy per run of blocks adjacent on both sides and layer group, or one gather when
        there are many. NOTE: the read's critical path: no numpy or torch dispatch on the copy path."""
        unit, nl, nr = self.local.block_bytes, self.local.num_blocks, self.remote.num_blocks
        # NOTE: raw pointers from here on (no NIXL registration, no torch bounds): a wrong id must not copy
        if local_blocks and not (0 <= min(local_blocks) and max(local_blocks) < nl and 0 <= min(remote_blocks)
                                 and max(remote_blocks) < nr and 0 <= groups.start and groups.stop <= min(
                                     self.local.num_layer_groups, self.remote.num_layer_groups)
                                 and groups.step == 1):
            raise ValueError(f"blocks or layer groups out of range: local {min(local_blocks)}..{max(local_blocks)} "
                             f"of {nl}, remote {min(remote_blocks, default=-1)}..{max(remote_blocks, default=-1)} "
                             f"of {nr}, groups {groups}")
        runs = block_runs(local_blocks, remote_blocks)
        num_bytes = unit * len(local_blocks) * len(groups)
        here = torch.cuda.current_device() == self.device_index
        with nullcontext() if here else torch.cuda.device(self.device_index):  # NOTE: the driver copies and
            if gathers(len(runs) * len(groups)):  # launches in the current device's context
                # NOTE: many short runs: one gather kernel beats a copy per run (H200s: 0.73x vs 0.35x of a GPU
                # copy for 255 scattered blocks); few long runs go to the copy engines (0.85x vs 0.74x)
                done = gather_units(self.stream, self.local_bytes, self.memory, unit, local_blocks, remote_blocks,
                                    groups, nl, nr, self.index_slots)
                return LocalRead([done.event], num_bytes, 1, int(done.fallback))
            copies = [((g * nl + lb) * unit, (g * nr + rb) * unit, k * unit) for g in groups for lb, rb, k in runs]
            done = copy_bytes(self.stream, self.local_bytes, self.memory, copies)
        return LocalRead([done.event], num_bytes, len(copies), int(done.fallback))

    def copy(self, plan: RankRead) -> Any:
        """Copy the plan's rows (absolute addresses in both allocations) into this rank's cache. CPU: done on
        return (None); GPU: returns the CUDA event that marks the end."""
        local, local_base = self.local_bytes, self.local.base_addr
        rows = zip(plan.local_rows.tolist(), plan.remote_rows.tolist(), strict=True)
        if self.stream is None:
            for (l_addr, n, _), (r_addr, _, _) in rows:
                lo, ro = l_addr - local_base, r_addr - self.base
                for i in range(0, n, COPY_CHUNK):
                    k = min(COPY_CHUNK, n - i)
                    local[lo + i:lo + i + k] = self.memory[ro + i:ro + i + k]
            return None
        with torch.cuda.stream(self.stream):
            for (l_addr, n, _), (r_addr, _, _) in rows:
                lo, ro = l_addr - local_base, r_addr - self.base
                local[lo:lo + n].copy_(self.memory[ro:ro + n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event


class LocalPeers:
    """The same-host peers one rank reads by local copy (kv_transfer.local_copy), mapped on first use."""

    def __init__(self, local: AgentDescriptor, local_bytes: Any, device: torch.device, enabled: bool,
                 auto: bool = False) -> None:
        """`auto`: on by default rather than asked for: only peers whose blocks are read whole (the same heads:
        the path measured and tested on GPUs) are copied locally; the others are read over NIXL, not counted
        as fallbacks."""
        self.local, self.local_bytes, self.device, self.enabled, self.auto = local, local_bytes, device, enabled, auto
        self.peers: dict[str, LocalPeer | None] = {}  # agent name -> its mapping (None: cannot be mapped)
        self.skipped: set[str] = set()  # auto: peers read over NIXL by choice
        # agent name -> a whole-unit GPU peer already read once (so checked compatible): its reads skip the
        # general path (TransferAgent.start_read)
        self.direct: dict[str, LocalPeer] = {}

    def wanted(self, remote: AgentDescriptor) -> bool:
        """Local copies are on and `remote` shares its memory on this host (a NIXL read of it is a fallback)."""
        return bool(self.enabled and remote.share and self.local.mem_type == remote.mem_type
                    and same_node(remote, self.local) and remote.agent_name not in self.skipped)

    def get(self, remote: AgentDescriptor) -> LocalPeer | None:
        """`remote` mapped, when it is wanted and can be; None otherwise."""
        if not self.wanted(remote):
            return None
        if remote.agent_name not in self.peers:
            if self.auto and not whole_blocks(self.local, remote):
                log.info("KV of %s holds other heads than this rank (TP differs): read over NIXL (local copies are "
                         "on by default only for whole blocks; kv_transfer.local_copy: true forces them)",
                         remote.agent_name)
                self.skipped.add(remote.agent_name)
                self.peers[remote.agent_name] = None
                return None
            peer = self.peers[remote.agent_name] = open_peer(self.local, self.local_bytes, remote, self.device)
            if peer is not None:
                how = "memcpy" if self.local.mem_type == "DRAM" else "driver copies or a gather kernel over CUDA IPC"
                log.info("KV read path %s->%s (same host) from %s: local copy (%s from its shared memory)",
                         self.local.mem_type, remote.mem_type, remote.agent_name, how)
        return self.peers[remote.agent_name]


def open_peer(local: AgentDescriptor, local_bytes: Any, desc: AgentDescriptor,
              local_device: torch.device) -> LocalPeer | None:
    """Map a same-host peer's KV, or None (logged, counted) when it cannot be."""
    global unavailable
    try:
        return LocalPeer(local, local_bytes, desc, local_device)
    except Exception as e:  # NOTE: e.g. a driver that refuses the handle, a kernel that will not compile
        unavailable += 1
        log.warning("KV of %s cannot be read locally (%s: %s): reading it over NIXL", desc.agent_name,
                    type(e).__name__, e)
        return None
