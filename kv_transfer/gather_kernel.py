"""The gather behind kv_transfer/gpu_copy.py: whole KV units from a peer's cache into this rank's, in place.

CUDA C, compiled once per process and architecture by NVRTC (which every CUDA build of torch ships), loaded into
each device's primary context, and launched through the driver with ctypes. NOTE: not Triton: its Python
launcher cost 40-150 us of host time per launch on the H200 hosts, against a 0.19 ms copy at 64 MB
(docs/performance.md, "Same-host GPU reads at line rate"); this launch is one ctypes call.

A launch names the read's blocks, not its units: program x is unit (group first_group + x // n, block x % n),
so a read of n blocks in G layer groups uploads 2n indices, and program y copies one chunk of that unit.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import struct
import threading

import torch

from kv_transfer.cuda_driver import INVALID_CONTEXT, Driver, check, driver

log = logging.getLogger(__name__)

THREADS = 256
UNROLL = 8  # loads a thread has in flight before it stores: the reads cross NVLink
_SOURCE = r"""
template <typename T>
__device__ __forceinline__ void gather(T* __restrict__ dst, const T* __restrict__ src,
                                       const long long* __restrict__ local_blocks,
                                       const long long* __restrict__ remote_blocks, long long n,
                                       long long first_group, long long local_per_group,
                                       long long remote_per_group, long long words) {
  const long long g = first_group + blockIdx.x / n, i = blockIdx.x % n;
  const T* s = src + (g * remote_per_group + remote_blocks[i]) * words;
  T* d = dst + (g * local_per_group + local_blocks[i]) * words;
  const long long j0 = (long long)blockIdx.y * (UNROLL * THREADS) + threadIdx.x;
  T v[UNROLL];
#pragma unroll
  for (int k = 0; k < UNROLL; ++k) {
    const long long j = j0 + k * THREADS;
    if (j < words) v[k] = s[j];
  }
#pragma unroll
  for (int k = 0; k < UNROLL; ++k) {
    const long long j = j0 + k * THREADS;
    if (j < words) d[j] = v[k];
  }
}

#define ARGS(T) T* dst, const T* src, const long long* local_blocks, const long long* remote_blocks, long long n, \
  long long first_group, long long local_per_group, long long remote_per_group, long long words
#define PASS dst, src, local_blocks, remote_blocks, n, first_group, local_per_group, remote_per_group, words
extern "C" __global__ void __launch_bounds__(THREADS) gather16(ARGS(uint4)) { gather<uint4>(PASS); }
extern "C" __global__ void __launch_bounds__(THREADS) gather8(ARGS(unsigned long long)) {
  gather<unsigned long long>(PASS);
}
"""


_ARGS = struct.Struct("<4Q5q")  # the kernels' arguments: 4 addresses, then n .. words (int64)
_Params = ctypes.c_void_p * 9


def _nvrtc() -> ctypes.CDLL:
    """NVRTC of torch's CUDA: by name (torch's wheels load it first), else from the pip NVIDIA packages."""
    major = (torch.version.cuda or "").split(".")[0]
    names = [f"libnvrtc.so.{major}", "libnvrtc.so"]
    for path in torch.__path__ + [os.path.dirname(os.path.dirname(p)) for p in torch.__path__]:
        names += sorted(glob.glob(os.path.join(path, "nvidia", "*", "lib", "libnvrtc.so*")))
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise OSError(f"no NVRTC library ({'; '.join(errors[:3])})")


def compile_cubin(arch: str) -> bytes:
    """The gathers compiled for `arch` (e.g. "sm_90")."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()

    def nvrtc_check(rc: int, what: str) -> None:
        if rc:
            text = b""
            size = ctypes.c_size_t()
            if prog and lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0 and size.value > 1:
                buf = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(prog, buf)
                text = buf.value
            raise RuntimeError(f"{what} failed: NVRTC error {rc} {text.decode(errors='replace')[:2000]}")

    source = f"#define THREADS {THREADS}\n#define UNROLL {UNROLL}\n{_SOURCE}".encode()
    nvrtc_check(lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"kv_gather.cu", 0, None, None),
                "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
        nvrtc_check(lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)),
                    "nvrtcCompileProgram")
        size = ctypes.c_size_t()
        nvrtc_check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc_check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class GatherKernel:
    """The two gathers (16-byte and 8-byte words) loaded into one device's primary context."""

    def __init__(self, device_index: int, drv: Driver) -> None:
        major, minor = torch.cuda.get_device_capability(device_index)
        self.drv, self.cubin = drv, _cubin_for(f"sm_{major}{minor}")
        self.module, self.ctx = ctypes.c_void_p(), ctypes.c_void_p()
        self.functions: dict[int, ctypes.c_void_p] = {}
        # NOTE: one argument buffer, packed per launch in one call (the launch copies it): building ctypes objects
        # per launch cost 15 us on the H200 hosts
        self.args = ctypes.create_string_buffer(_ARGS.size)
        self.params = _Params(*[ctypes.addressof(self.args) + 8 * i for i in range(9)])
        self.lock = threading.Lock()
        with torch.cuda.device(device_index):
            torch.cuda.current_stream().synchronize()  # NOTE: makes the primary context current on this thread
            check(drv.ctx_get_current(ctypes.byref(self.ctx)), "cuCtxGetCurrent")
            check(drv.module_load_data(ctypes.byref(self.module), self.cubin), "cuModuleLoadData")
            for word, name in ((16, b"gather16"), (8, b"gather8")):
                fn = ctypes.c_void_p()
                check(drv.module_get_function(ctypes.byref(fn), self.module, name), "cuModuleGetFunction")
                self.functions[word] = fn

    def launch(self, stream: int, word: int, dst: int, src: int, local: int, remote: int, n: int, groups: range,
               local_per_group: int, remote_per_group: int, unit_bytes: int) -> None:
        """Copy unit (g, remote[i]) of `src` to unit (g, local[i]) of `dst` for g in `groups`, i < n (all device
        addresses; `word` bytes at a time: 16 or 8, dividing the unit and both addresses) on `stream`."""
        words = unit_bytes // word
        chunks = -(-words // (UNROLL * THREADS))
        units = n * len(groups)
        if units >= 2**31 or chunks >= 2**16:
            raise ValueError(f"a gather of {units} units of {chunks} chunks is past CUDA's grid")
        fn, launch = self.functions[word], self.drv.launch
        with self.lock:
            _ARGS.pack_into(self.args, 0, dst, src, local, remote, n, groups.start, local_per_group,
                            remote_per_group, words)
            rc = launch(fn, units, chunks, 1, THREADS, 1, 1, 0, stream, self.params, None)
            if rc == INVALID_CONTEXT:  # NOTE: a thread that never made this device's context current
                check(self.drv.ctx_set_current(self.ctx), "cuCtxSetCurrent")
                rc = launch(fn, units, chunks, 1, THREADS, 1, 1, 0, stream, self.params, None)
        check(rc, "cuLaunchKernel")


_cubins: dict[str, bytes] = {}


def _cubin_for(arch: str) -> bytes:
    if arch not in _cubins:
        _cubins[arch] = compile_cubin(arch)
    return _cubins[arch]


_kernels: dict[int, GatherKernel | None] = {}


def kernel_for(device_index: int) -> GatherKernel | None:
    """The gather for this device, or None (logged once per device) where it cannot be built or loaded."""
    if device_index not in _kernels:
        drv = driver()
        try:
            if drv is None:
                raise OSError("no CUDA driver")
            _kernels[device_index] = GatherKernel(device_index, drv)
        except Exception as e:  # NOTE: no NVRTC, an architecture it does not know, a driver that refuses: all logged
            log.warning("KV gather kernel unavailable on cuda:%d (%s): gathering with torch (two passes, slower)",
                        device_index, e)
            _kernels[device_index] = None
    return _kernels[device_index]


def forget(device_index: int) -> None:
    """Drop a device's gather after it failed at launch (the next read gathers with torch; logged by the caller)."""
    _kernels[device_index] = None
