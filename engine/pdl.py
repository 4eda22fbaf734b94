"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper and later).

A decode step at small batch is ~350 short kernels; each one's launch and ramp-up would otherwise wait for the
previous kernel to drain. With PDL a kernel is launched while its predecessor is still running, and it blocks
in `gdc_wait` until the predecessor has finished and its writes are visible. The small-batch GEMM issues its
first weight loads before that wait, since weights are never written by an earlier kernel.

Contract for every kernel launched with `launch_kwargs()`: when its `USE_PDL` constexpr is set it calls
`tl.extra.cuda.gdc_wait()` before it reads anything an earlier kernel may have written and before it writes
anything, then `gdc_launch_dependents()`. Kernels that are not Triton (cuBLAS, PyTorch) are launched normally
and wait for their predecessor as usual, so mixing is safe.

NOTE: `PDSERVE_PDL=0` turns it off (A/B measurement; a driver that mishandles PDL). It is on only where the
GPU is sm_90+ and this Triton accepts `launch_pdl`; when CUDA is present but one of those is missing, that is
logged once and counted (`pdl_unsupported` in the engine's metrics).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import torch

from engine import envs
from engine.metrics import count_fallback

log = logging.getLogger(__name__)
_state: dict[str, bool] = {}


def _supported() -> bool:
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability()[0] < 9:
        why = "the GPU is older than sm_90"
    else:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions

            fields = {f.name for f in dataclasses.fields(CUDAOptions)}
            why = "" if "launch_pdl" in fields else "this Triton has no launch_pdl"
        except Exception as e:  # a Triton without the NVIDIA backend layout we know
            why = f"cannot inspect Triton's CUDA options ({e})"
    if why:
        count_fallback("pdl_unsupported")
        log.info("programmatic dependent launch off: %s", why)
        return False
    return True


def enabled() -> bool:
    """Whether decode kernels are launched with PDL (decided once per process)."""
    if "on" not in _state:
        _state["on"] = envs.PDSERVE_PDL.get() and _supported()
        if _state["on"]:
            log.info("programmatic dependent launch on for the Triton decode kernels")
    return _state["on"]


_ON: dict[str, bool] = {"launch_pdl": True}
_OFF: dict[str, bool] = {}


def launch_kwargs() -> dict[str, bool]:
    """Extra launch arguments for a kernel that honours the contract above (its USE_PDL = enabled()). A shared
    dict, built once: spread it (`**`), never change it."""
    return _ON if enabled() else _OFF
