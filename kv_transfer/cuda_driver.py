"""The CUDA driver calls same-host GPU reads make (kv_transfer/gpu_copy.py, kv_transfer/gather_kernel.py), through
ctypes: about 1-3 us a call from Python, with no tensor dispatch, stream switch or torch event around it.

One process-wide `Driver`, loaded on first use; None (logged once) where libcuda cannot be loaded, and dropped
(`disable`) after a call fails, so the callers take torch's slower way from then on (they log and count it).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

NOT_READY = 600  # CUDA_ERROR_NOT_READY
INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT: this thread has no (or another) current context


class Driver:
    """libcuda's entry points a read needs, typed for ctypes."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        u64, ptr, uint = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint
        self.memcpy = self._fn(lib.cuMemcpyAsync, [u64, u64, ctypes.c_size_t, ptr])
        self.event_create = self._fn(lib.cuEventCreate, [ctypes.POINTER(ptr), uint])
        self.event_record = self._fn(lib.cuEventRecord, [ptr, ptr])
        self.event_query = self._fn(lib.cuEventQuery, [ptr])
        self.event_sync = self._fn(lib.cuEventSynchronize, [ptr])
        self.event_destroy = self._fn(lib.cuEventDestroy_v2, [ptr])
        self.ctx_get_current = self._fn(lib.cuCtxGetCurrent, [ctypes.POINTER(ptr)])
        self.ctx_set_current = self._fn(lib.cuCtxSetCurrent, [ptr])
        self.module_load_data = self._fn(lib.cuModuleLoadData, [ctypes.POINTER(ptr), ctypes.c_char_p])
        self.module_get_function = self._fn(lib.cuModuleGetFunction, [ctypes.POINTER(ptr), ptr, ctypes.c_char_p])
        self.launch = self._fn(lib.cuLaunchKernel, [ptr, uint, uint, uint, uint, uint, uint, uint, ptr, ptr, ptr])

    @staticmethod
    def _fn(fn: Any, argtypes: list[Any]) -> Any:
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return fn


_driver: Driver | None = None
_driver_tried = False


def driver() -> Driver | None:
    """The driver, or None (logged once) where libcuda cannot be loaded."""
    global _driver, _driver_tried
    if not _driver_tried:
        _driver_tried = True
        try:
            _driver = Driver()
        except (OSError, AttributeError) as e:
            log.warning("CUDA driver not loadable for KV copies (%s): copying with torch copy_ (slower)", e)
    return _driver


def disable() -> None:
    """Stop using the driver in this process (after a call failed; the caller logs why)."""
    global _driver
    _driver = None


def check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} failed: CUDA driver error {rc}")


class CopyEvent:
    """A driver event recorded on a stream after a read's copies (torch.cuda.Event's query/synchronize)."""

    def __init__(self, drv: Driver, stream: int) -> None:
        self.drv, self.handle = drv, ctypes.c_void_p()
        check(drv.event_create(ctypes.byref(self.handle), 2), "cuEventCreate")  # 2: CU_EVENT_DISABLE_TIMING
        check(drv.event_record(self.handle, stream), "cuEventRecord")

    def query(self) -> bool:
        rc = self.drv.event_query(self.handle)
        if rc == NOT_READY:
            return False
        check(rc, "cuEventQuery")
        return True

    def synchronize(self) -> None:
        check(self.drv.event_sync(self.handle), "cuEventSynchronize")

    def __del__(self) -> None:
        if self.handle:
            self.drv.event_destroy(self.handle)
