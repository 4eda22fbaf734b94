"""Same-host reads without UCX: the reader maps the holder's KV allocation and copies the bytes itself.

UCX's same-host transports copy slower than the hardware allows: cma (DRAM) with one `process_vm_readv` call in the
posting thread, at 0.55-0.65x of a plain memcpy, and cuda_ipc (VRAM) on one CUDA stream per peer, at 0.6-0.7x of
a GPU-to-GPU copy (docs/performance.md). So each agent publishes how a same-host reader may map its KV
(`AgentDescriptor.share`):

  - "memfd:PID:FD" on CPU: the cache lives in a memfd (engine/kv_cache.py), mapped read-only through
    /proc/PID/fd/FD and copied with memcpy (numpy slice assignment, in 2 MiB pieces);
  - "cudaipc:B64" on GPU: the CUDA IPC handle of the cache's allocation (what torch shares tensors between
    processes with), opened in the reader's device context (peer access over NVLink) and copied with
    cudaMemcpyAsync on a stream of the reader's own; the read is done when that stream's event is.

With `kv_transfer.local_copy` on, a reader on the same host reads such a peer this way. The control messages
(release, acknowledgement, streaming) still go over NIXL, and a peer that cannot be mapped (another host, its
process gone, a driver that refuses) is read over NIXL as before, with a warning and a count (`unavailable`).
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import numpy as np
import torch

from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.plan import RankRead, merged_descriptors, piece, plan_reads, unit_indices

log = logging.getLogger(__name__)

GATHER_ABOVE_RUNS = 16  # GPU: a read of more runs than this goes as one gather kernel, fewer as a copy per run
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


class LocalPeer:
    """A same-host holder's KV allocation, mapped for reading: `memory` [its total bytes] uint8."""

    def __init__(self, desc: AgentDescriptor, local_device: torch.device) -> None:
        kind, _, rest = desc.share.partition(":")
        size = desc.num_layer_groups * desc.num_blocks * desc.block_bytes
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
        else:
            raise ValueError(f"{desc.agent_name} shares no memory this {local_device.type} reader can map "
                             f"({kind or 'none'}, {desc.mem_type})")

    def read(self, local_desc: AgentDescriptor, remote: AgentDescriptor, local: Any, local_blocks: list[int],
             remote_blocks: list[int], groups: range) -> tuple[list[Any], int, int]:
        """Copy remote_blocks of the peer (`remote`) into local_blocks of `local` (this rank's cache as [bytes]
        uint8), in the layer groups `groups`. Returns (CUDA events to wait for: none on CPU, bytes, pieces)."""
        unit = local_desc.block_bytes
        if self.stream is not None and piece(local_desc, remote).size == unit == remote.block_bytes:
            li = unit_indices(local_desc, np.asarray(local_blocks), groups)  # [len(groups) · n]
            ri = unit_indices(remote, np.asarray(remote_blocks), groups)  # [len(groups) · n]
            if merged_descriptors(local_desc, remote, li, ri) > GATHER_ABOVE_RUNS:
                # NOTE: many short runs: one gather kernel beats a copy per run (H200s: 0.73x vs 0.35x of a GPU
                # copy for 255 scattered blocks); few long runs go to the copy engines (0.85x vs 0.74x)
                return [copy_units(self, local, unit, li, ri)], unit * len(li), 1
        events, num_bytes, num_descs = [], 0, 0
        for plan in plan_reads(local_desc, [remote], local_blocks, remote_blocks, 1 << 62, groups):
            event = self.copy(local, local_desc.base_addr, plan)  # CPU: done on return
            if event is not None:
                events.append(event)
            num_bytes += plan.num_bytes
            num_descs += len(plan.local_rows)
        return events, num_bytes, num_descs

    def copy(self, local: Any, local_base: int, plan: RankRead) -> Any:
        """Copy the plan's rows (absolute addresses in both allocations) into `local` ([bytes] uint8, numpy on
        CPU, a tensor on GPU). CPU: done on return (None); GPU: returns the CUDA event that marks the end."""
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


def copy_units(peer: LocalPeer, local: torch.Tensor, unit_bytes: int, local_idx: np.ndarray,
               remote_idx: np.ndarray) -> Any:
    """GPU, whole blocks on both sides: units remote_idx of the peer into units local_idx of `local` ([bytes]
    uint8), as one gather over NVLink and one local scatter (two kernels, not one copy per run). Returns the
    CUDA event that marks the end."""
    assert peer.stream is not None and unit_bytes % 8 == 0
    with torch.cuda.stream(peer.stream):
        dev = local.device
        li = torch.from_numpy(local_idx.astype(np.int64)).to(dev, non_blocking=True)  # [n]
        ri = torch.from_numpy(remote_idx.astype(np.int64)).to(dev, non_blocking=True)  # [n]
        src = peer.memory.view(torch.int64).view(-1, unit_bytes // 8)  # [G · remote blocks, unit words]
        dst = local.view(torch.int64).view(-1, unit_bytes // 8)  # [G · local blocks, unit words]
        dst.index_copy_(0, li, src.index_select(0, ri))
        event = torch.cuda.Event()
        event.record(peer.stream)
    return event


def open_peer(desc: AgentDescriptor, local_device: torch.device) -> LocalPeer | None:
    """Map a same-host peer's KV, or None (logged, counted) when it cannot be."""
    global unavailable
    try:
        return LocalPeer(desc, local_device)
    except (OSError, ValueError, RuntimeError) as e:
        unavailable += 1
        log.warning("KV of %s cannot be read locally (%s: %s): reading it over NIXL", desc.agent_name,
                    type(e).__name__, e)
        return None
