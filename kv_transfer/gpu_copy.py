"""GPU copies of whole KV units (one layer group of one block) from a peer's mapped cache into this rank's.

A same-host read over CUDA IPC (kv_transfer/local_copy.py) is a list of (local block, remote block) pairs. Its
host work is on the read's critical path: at 64 MB the copy itself takes about 0.19 ms on two H200s, so every
10 us of Python before the first byte moves costs 5% of the line rate (issue 20; `bench/local_read_cost.py`
splits it). Hence, per read:

  - the runs of blocks adjacent on both sides come from one pass over the two lists (`block_runs`);
  - few long runs go to the copy engines, one `cuMemcpyAsync` per run and layer group, called through the
    driver (no tensor slicing, dispatch or stream switch per run), ended by a driver event (`CopyEvent`);
    a driver that cannot be loaded falls back to torch `copy_` and torch events (logged and counted);
  - many short runs go to one gather kernel that reads each remote unit over NVLink and writes it in place
    (Triton; without it, torch's index_select + index_copy_, two passes, logged and counted).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

GATHER_ABOVE_RUNS = 16  # a read of more copies than this goes as one gather kernel, fewer as a copy per run
GATHER_BLOCK = 4096  # int64 words (32 KiB) a gather program copies
fallbacks = {"torch_copy": 0, "torch_gather": 0}  # copies that could not take the fast path, in this process
_NOT_READY = 600  # CUDA_ERROR_NOT_READY


def gathers(num_copies: int) -> bool:
    """Whether a read of this many copies goes as one gather kernel."""
    return num_copies > GATHER_ABOVE_RUNS


class GpuCopy(NamedTuple):
    event: Any  # CopyEvent or torch.cuda.Event: done once the copy is
    fallback: bool  # it went the slower way (no driver / no Triton)


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


class _Driver:
    """The CUDA driver calls a copy needs, through ctypes (about 1 us each from Python)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        u64, ptr, uint = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint
        self.memcpy = self._fn(lib.cuMemcpyAsync, [u64, u64, ctypes.c_size_t, ptr])
        self.event_create = self._fn(lib.cuEventCreate, [ctypes.POINTER(ptr), uint])
        self.event_record = self._fn(lib.cuEventRecord, [ptr, ptr])
        self.event_query = self._fn(lib.cuEventQuery, [ptr])
        self.event_sync = self._fn(lib.cuEventSynchronize, [ptr])
        self.event_destroy = self._fn(lib.cuEventDestroy_v2, [ptr])

    @staticmethod
    def _fn(fn: Any, argtypes: list[Any]) -> Any:
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return fn


_driver: _Driver | None = None
_driver_tried = False


def driver() -> _Driver | None:
    """The driver, or None (logged once) where libcuda cannot be loaded."""
    global _driver, _driver_tried
    if not _driver_tried:
        _driver_tried = True
        try:
            _driver = _Driver()
        except (OSError, AttributeError) as e:
            log.warning("CUDA driver not loadable for KV copies (%s): copying with torch copy_ (slower)", e)
    return _driver


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} failed: CUDA driver error {rc}")


class CopyEvent:
    """A driver event recorded on a stream after a read's copies (torch.cuda.Event's query/synchronize)."""

    def __init__(self, drv: _Driver, stream: int) -> None:
        self.drv, self.handle = drv, ctypes.c_void_p()
        _check(drv.event_create(ctypes.byref(self.handle), 2), "cuEventCreate")  # 2: CU_EVENT_DISABLE_TIMING
        _check(drv.event_record(self.handle, stream), "cuEventRecord")

    def query(self) -> bool:
        rc = self.drv.event_query(self.handle)
        if rc == _NOT_READY:
            return False
        _check(rc, "cuEventQuery")
        return True

    def synchronize(self) -> None:
        _check(self.drv.event_sync(self.handle), "cuEventSynchronize")

    def __del__(self) -> None:
        if self.handle:
            self.drv.event_destroy(self.handle)


def copy_bytes(stream: Any, dst: torch.Tensor, src: torch.Tensor, copies: list[tuple[int, int, int]]) -> GpuCopy:
    """Copy (dst offset, src offset, bytes) of `copies` from `src` into `dst` (both [bytes] uint8 on the
    stream's device; src is the peer's mapped cache) on `stream`, one copy-engine copy each. The stream's device
    must be current. Returns its end; if it raises, nothing it enqueued is still running."""
    drv = driver()
    if drv is not None:
        d, s, h = dst.data_ptr(), src.data_ptr(), stream.cuda_stream
        try:
            for a, b, n in copies:
                _check(drv.memcpy(d + a, s + b, n, h), "cuMemcpyAsync")
            return GpuCopy(CopyEvent(drv, h), False)
        except RuntimeError as e:  # NOTE: a copy is idempotent, so the ones already enqueued may run again
            global _driver
            log.warning("KV copy through the driver failed (%s): copying with torch copy_ from now on", e)
            _driver = None
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


_gather_kernel: Any = None
_gather_tried = False


def _triton_gather() -> Any:
    global _gather_kernel, _gather_tried
    if not _gather_tried:
        _gather_tried = True
        try:
            from kv_transfer.gather_kernel import gather_units_kernel
            _gather_kernel = gather_units_kernel
        except ImportError as e:
            log.warning("no triton for KV gathers (%s): two torch passes instead (slower)", e)
    return _gather_kernel


def unit_pairs(local_blocks: list[int], remote_blocks: list[int], groups: range, local_blocks_per_group: int,
               remote_blocks_per_group: int) -> np.ndarray:
    """The units a read copies, group by group: [2, len(groups) · n] int64, row 0 local, row 1 remote (a unit's
    index is group · blocks per group + block, its place in memory)."""
    g = np.arange(groups.start, groups.stop, dtype=np.int64)[:, None]  # [G, 1]
    out = np.empty((2, len(groups), len(local_blocks)), dtype=np.int64)  # [2, G, n]
    out[0] = g * local_blocks_per_group + np.asarray(local_blocks, dtype=np.int64)
    out[1] = g * remote_blocks_per_group + np.asarray(remote_blocks, dtype=np.int64)
    return out.reshape(2, -1)


class IndexSlots:
    """Where a gather's unit pairs cross to the GPU: pinned host buffers and their device twins, each copied by
    the driver (torch's copy from pageable memory stages through a bounce buffer). A slot is reused once the
    gather that read it has ended; when none has, another is added (several reads may be in flight)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.slots: list[tuple[torch.Tensor, np.ndarray, torch.Tensor]] = []  # (pinned, its numpy view, device)
        self.busy: list[Any] = []  # per slot: the end of the last gather that read it (None: free)

    def upload(self, drv: _Driver, stream: Any, pairs: np.ndarray) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(slot, local units, remote units: [n] int64 each on the device), copied on `stream`; the caller marks
        the slot `used` once its gather is enqueued."""
        n = pairs.shape[1]
        half = n + (n & 1)  # NOTE: row 1 at a 16-byte boundary: Triton compiles one variant for every read
        i = next((k for k, end in enumerate(self.busy) if end is None or end.query()), len(self.slots))
        if i == len(self.slots) or len(self.slots[i][1]) < 2 * half:
            pinned = torch.empty(max(2 * half, 4096), dtype=torch.int64, pin_memory=True)  # [capacity]
            slot = (pinned, pinned.numpy(), torch.empty(len(pinned), dtype=torch.int64, device=self.device))
            if i == len(self.slots):
                self.slots.append(slot)
                self.busy.append(None)
            else:
                self.slots[i] = slot
        _, host, dev = self.slots[i]
        host[:n] = pairs[0]
        host[half:half + n] = pairs[1]
        self.busy[i] = None
        _check(drv.memcpy(dev.data_ptr(), host.ctypes.data, 2 * half * 8, stream.cuda_stream), "cuMemcpyAsync")
        return i, dev[:n], dev[half:half + n]

    def used(self, slot: int, end: Any) -> None:
        self.busy[slot] = end


def _torch_upload(pairs: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs through torch's copy (no driver): (local units, remote units), row 1 16-byte aligned too."""
    n = pairs.shape[1]
    half = n + (n & 1)
    flat = np.zeros(2 * half, dtype=np.int64)  # [2 · half]
    flat[:n], flat[half:half + n] = pairs[0], pairs[1]
    idx = torch.from_numpy(flat).to(device, non_blocking=True)  # [2 · half]
    return idx[:n], idx[half:half + n]


def gather_units(stream: Any, dst: torch.Tensor, src: torch.Tensor, unit_bytes: int, pairs: np.ndarray,
                 slots: IndexSlots | None = None) -> GpuCopy:
    """Units pairs[1] of `src` into units pairs[0] of `dst` ([bytes] uint8; pairs: [2, n] int64, `unit_pairs`)
    on `stream`, in one kernel that reads over NVLink and writes in place; the pairs cross through `slots`
    (else torch's copy). Returns its end. NOTE: if it raises, whatever it enqueued has finished (the stream is
    synchronized), so a failed read leaves nothing writing into the cache."""
    global _gather_kernel
    assert unit_bytes % 8 == 0
    words = unit_bytes // 8
    drv = driver()
    with torch.cuda.stream(stream):
        slot = -1
        try:
            if slots is not None and drv is not None:
                slot, li, ri = slots.upload(drv, stream, pairs)  # [n], [n]
            else:
                li, ri = _torch_upload(pairs, dst.device)  # [n], [n]
            src_w, dst_w = src.view(torch.int64), dst.view(torch.int64)  # [words of the cache]
            kernel = _triton_gather()
            if kernel is not None:
                try:
                    kernel[(len(li), -(-words // GATHER_BLOCK))](dst_w, src_w, li, ri, words, BLOCK=GATHER_BLOCK)
                except Exception as e:  # NOTE: e.g. a compiler that fails on this GPU: torch's gather from now on
                    log.warning("KV gather kernel failed (%s: %s): gathering with torch from now on",
                                type(e).__name__, e)
                    _gather_kernel = kernel = None
            fallback = kernel is None
            if fallback:
                fallbacks["torch_gather"] += 1
                rows = src_w.view(-1, words).index_select(0, ri)  # [n, words]
                dst_w.view(-1, words).index_copy_(0, li, rows)
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


def warm_gather(stream: Any, device: torch.device, unit_bytes: int) -> None:
    """Compile the gather kernel for this unit size now, on scratch memory (else the first scattered read of a
    peer waits about a second for Triton)."""
    if unit_bytes % 8 or _triton_gather() is None:
        return
    scratch = torch.zeros(2 * unit_bytes, dtype=torch.uint8, device=device)  # [2 units]
    pairs = np.zeros((2, 1), dtype=np.int64)
    gather_units(stream, scratch[unit_bytes:], scratch[:unit_bytes], unit_bytes, pairs).event.synchronize()
