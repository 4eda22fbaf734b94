"""GPU copies of whole KV units (one layer group of one block) from a peer's mapped cache into this rank's.

A same-host read over CUDA IPC (kv_transfer/local_copy.py) is a list of (local block, remote block) pairs. Its
host work is on the read's critical path: at 64 MB the copy itself takes about 0.19 ms on two H200s, so every
10 us of Python before the first byte moves costs 5% of the line rate (issue 20; `bench/local_read_cost.py`
splits it). Hence, per read:

  - the runs of blocks adjacent on both sides come from one pass over the two lists (`block_runs`);
  - few long runs go to the copy engines, one `cuMemcpyAsync` per run and layer group, called through the
    driver (kv_transfer/cuda_driver.py: no tensor slicing, dispatch or stream switch per run), ended by a
    driver event (`CopyEvent`);
    a driver that cannot be loaded falls back to torch `copy_` and torch events (logged and counted);
  - many short runs go to one gather kernel that reads each remote unit over NVLink and writes it in place
    (kv_transfer/gather_kernel.py, launched by one driver call; without it, torch's index_select +
    index_copy_, two passes, logged and counted).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch

from kv_transfer import cuda_driver, gather_kernel
from kv_transfer.cuda_driver import CopyEvent, Driver, check, driver

log = logging.getLogger(__name__)

GATHER_ABOVE_RUNS = 16  # a read of more copies than this goes as one gather kernel, fewer as a copy per run
fallbacks = {"torch_copy": 0, "torch_gather": 0}  # copies that could not take the fast path, in this process


def gathers(num_copies: int) -> bool:
    """Whether a read of this many copies goes as one gather kernel."""
    return num_copies > GATHER_ABOVE_RUNS


class GpuCopy(NamedTuple):
    event: Any  # CopyEvent or torch.cuda.Event: done once the copy is
    fallback: bool  # it went the slower way (no driver / no gather kernel)


def block_runs(local_blocks: list[int], remote_blocks: list[int]) -> list[tuple[int, int, int]]:
    """Runs of pairs adjacent on both sides: [(first local block, first remote block, blocks)]. A plain loop:
    cheaper than numpy's per-call cost for the tens of blocks a read has (1.7 us for 32)."""
    runs: list[tuple[int, int, int]] = []
    if not local_blocks:
        return runs
    l0 = pl = local_blocks[0]
    r0 = pr = remote_blocks[0]
    for lb, rb in zip(local_blocks[1:], remote_blocks[1:], strict=True):
        if lb != pl + 1 or rb != pr + 1:
            runs.append((l0, r0, pl - l0 + 1))
            l0, r0 = lb, rb
        pl, pr = lb, rb
    runs.append((l0, r0, pl - l0 + 1))
    return runs


def copy_bytes(stream: Any, dst: torch.Tensor, src: torch.Tensor, copies: list[tuple[int, int, int]]) -> GpuCopy:
    """Copy (dst offset, src offset, bytes) of `copies` from `src` into `dst` (both [bytes] uint8 on the
    stream's device; src is the peer's mapped cache) on `stream`, one copy-engine copy each. The stream's device
    must be current. Returns its end; if it raises, nothing it enqueued is still running."""
    drv = driver()
    if drv is not None:
        d, s, h = dst.data_ptr(), src.data_ptr(), stream.cuda_stream
        try:
            for a, b, n in copies:
                check(drv.memcpy(d + a, s + b, n, h), "cuMemcpyAsync")
            return GpuCopy(CopyEvent(drv, h), False)
        except RuntimeError as e:  # NOTE: a copy is idempotent, so the ones already enqueued may run again
            log.warning("KV copy through the driver failed (%s): copying with torch copy_ from now on", e)
            cuda_driver.disable()
    fallbacks["torch_copy"] += 1
    with torch.cuda.stream(stream):
        try:
            for a, b, n in copies:
                dst[a:a + n].copy_(src[b:b + n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        except BaseException:  # NOTE: nothing enqueued may still write once the read is reported failed
            stream.synchronize()
            raise
    return GpuCopy(event, True)


def unit_pairs(local_blocks: list[int], remote_blocks: list[int], groups: range, local_blocks_per_group: int,
               remote_blocks_per_group: int) -> np.ndarray:
    """The units a read copies, group by group: [2, len(groups) · n] int64, row 0 local, row 1 remote (a unit's
    index is group · blocks per group + block, its place in memory). The torch gather's indices."""
    g = np.arange(groups.start, groups.stop, dtype=np.int64)[:, None]  # [G, 1]
    out = np.empty((2, len(groups), len(local_blocks)), dtype=np.int64)  # [2, G, n]
    out[0] = g * local_blocks_per_group + np.asarray(local_blocks, dtype=np.int64)
    out[1] = g * remote_blocks_per_group + np.asarray(remote_blocks, dtype=np.int64)
    return out.reshape(2, -1)


class IndexSlots:
    """Where a gather's block lists cross to the GPU: pinned host buffers and their device twins, each copied by
    the driver (torch's copy from pageable memory stages through a bounce buffer). A slot is reused once the
    gather that read it has ended; when none has, another is added (several reads may be in flight)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # (pinned, its numpy view, its address, device twin, the twin's address)
        self.slots: list[tuple[torch.Tensor, np.ndarray, int, torch.Tensor, int]] = []
        self.busy: list[Any] = []  # per slot: the end of the last gather that read it (None: free)

    def upload(self, drv: Driver, stream: Any, local_blocks: list[int], remote_blocks: list[int]
               ) -> tuple[int, int, int]:
        """(slot, device address of the local blocks, of the remote blocks: [n] int64 each), copied on `stream`;
        the caller marks the slot `used` once its gather is enqueued."""
        n = len(local_blocks)
        i = 0
        for end in self.busy:  # NOTE: a plain loop: this is the read's critical path
            if end is None or end.query():
                break
            i += 1
        if i == len(self.slots) or len(self.slots[i][1]) < 2 * n:
            pinned = torch.empty(max(2 * n, 4096), dtype=torch.int64, pin_memory=True)  # [capacity]
            dev = torch.empty(len(pinned), dtype=torch.int64, device=self.device)  # [capacity]
            slot = (pinned, pinned.numpy(), pinned.data_ptr(), dev, dev.data_ptr())
            if i == len(self.slots):
                self.slots.append(slot)
                self.busy.append(None)
            else:
                self.slots[i] = slot
        _, host, host_ptr, _, dev_ptr = self.slots[i]
        host[:2 * n] = local_blocks + remote_blocks
        self.busy[i] = None
        check(drv.memcpy(dev_ptr, host_ptr, 2 * n * 8, stream.cuda_stream), "cuMemcpyAsync")
        return i, dev_ptr, dev_ptr + 8 * n

    def used(self, slot: int, end: Any) -> None:
        self.busy[slot] = end


def _word(unit_bytes: int, dst: int = 0, src: int = 0) -> int:
    """The widest word (16 or 8 bytes) dividing the unit and both addresses; 0 when neither does."""
    low = unit_bytes | dst | src
    return 16 if not low & 15 else 8 if not low & 7 else 0


def gather_units(stream: Any, dst: torch.Tensor, src: torch.Tensor, unit_bytes: int, local_blocks: list[int],
                 remote_blocks: list[int], groups: range, local_per_group: int, remote_per_group: int,
                 slots: IndexSlots | None = None) -> GpuCopy:
    """Unit (g, remote_blocks[i]) of `src` into unit (g, local_blocks[i]) of `dst` ([bytes] uint8; a unit's
    index is g · blocks per group + block) for every g in `groups`, on `stream`, in one kernel that reads over
    NVLink and writes in place (kv_transfer/gather_kernel.py); the block lists cross through `slots` (else
    torch's copy). The stream's device must be current. Returns its end. NOTE: if it raises, whatever it
    enqueued has finished (the stream is synchronized), so a failed read leaves nothing writing into the cache."""
    n, d, s = len(local_blocks), dst.data_ptr(), src.data_ptr()
    word = _word(unit_bytes, d, s)
    drv = driver()
    kernel = gather_kernel.kernel_for(stream.device_index) if drv is not None and word else None
    slot = -1
    try:
        if kernel is not None:
            try:
                if slots is not None:
                    slot, local, remote = slots.upload(drv, stream, local_blocks, remote_blocks)
                else:
                    with torch.cuda.stream(stream):  # NOTE: allocated on the stream: freed after the kernel reads
                        blocks = torch.tensor(local_blocks + remote_blocks, dtype=torch.int64).to(dst.device)  # [2n]
                    local, remote = blocks.data_ptr(), blocks.data_ptr() + 8 * n
                kernel.launch(stream.cuda_stream, word, d, s, local, remote, n, groups, local_per_group,
                              remote_per_group, unit_bytes)
            except ValueError as e:  # a read too large for one grid: torch's gather for this one
                log.warning("KV gather of this read with torch: %s", e)
                kernel = None
            except RuntimeError as e:  # NOTE: torch's gather from now on (a launch enqueues all or nothing)
                log.warning("KV gather kernel failed (%s): gathering with torch from now on", e)
                gather_kernel.forget(stream.device_index)
                kernel = None
        fallback = kernel is None
        if fallback:
            fallbacks["torch_gather"] += 1
            _torch_gather(stream, dst, src, unit_bytes, word,
                          unit_pairs(local_blocks, remote_blocks, groups, local_per_group, remote_per_group))
        if drv is not None:
            event: Any = CopyEvent(drv, stream.cuda_stream)
        else:
            event = torch.cuda.Event()
            event.record(stream)
    except BaseException:
        stream.synchronize()
        raise
    if slots is not None and slot >= 0:
        slots.used(slot, event)
    return GpuCopy(event, fallback)


def _torch_gather(stream: Any, dst: torch.Tensor, src: torch.Tensor, unit_bytes: int, word: int,
                  pairs: np.ndarray) -> None:
    """The gather without the kernel: torch's index_select into a temporary, then index_copy_ (two passes)."""
    dtype = torch.int64 if word else torch.uint8
    cols = unit_bytes // dtype.itemsize
    with torch.cuda.stream(stream):
        idx = torch.from_numpy(pairs).to(dst.device, non_blocking=True)  # [2, units]
        rows = src.view(dtype).view(-1, cols).index_select(0, idx[1])  # [units, cols]
        dst.view(dtype).view(-1, cols).index_copy_(0, idx[0], rows)


def warm_gather(stream: Any, device: torch.device, unit_bytes: int) -> None:
    """Build the gather for this device now and check it on scratch memory (else the first scattered read of a
    peer waits for the compiler); a gather that copies wrong is dropped (logged): torch's from then on."""
    index = device.index or 0
    if driver() is None or not _word(unit_bytes) or gather_kernel.kernel_for(index) is None:
        return
    with torch.cuda.device(index):
        scratch = torch.randint(0, 256, (3 * unit_bytes,), dtype=torch.uint8, device=device)  # [3 units]
        gather_units(stream, scratch, scratch, unit_bytes, [2], [0], range(1), 3, 3).event.synchronize()
        if not torch.equal(scratch[2 * unit_bytes:], scratch[:unit_bytes]):
            log.warning("KV gather kernel copied wrong bytes on %s: gathering with torch", device)
            gather_kernel.forget(index)
