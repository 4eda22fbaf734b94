"""The Triton kernel behind kv_transfer/gpu_copy.py's gather: whole KV units from a peer's cache, in place."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_units_kernel(
    dst_ptr,  # [local units · words] int64: this rank's cache
    src_ptr,  # [remote units · words] int64: the peer's cache, mapped over CUDA IPC (read over NVLink)
    local_ptr, remote_ptr,  # [n] int64: unit i of the read goes from unit remote[i] to unit local[i]
    words,  # int64 words in a unit
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    c = tl.program_id(1)
    d = tl.load(local_ptr + i) * words  # int64: unit offsets pass 2**31 words in a large cache
    s = tl.load(remote_ptr + i) * words
    offs = c * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = offs < words
    tl.store(dst_ptr + d + offs, tl.load(src_ptr + s + offs, mask=mask), mask=mask)
