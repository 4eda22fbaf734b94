"""Same-run baselines for the GPU benchmarks: device copy bandwidth and bf16 matmul rate, and a timer."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch


def time_cuda(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call of `fn` (after one warm-up call), synchronised at both ends."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")  # [2^30]: 2 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / time_cuda(lambda: dst.copy_(src), 20)


def matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 matmul."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")  # [M, K]
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")  # [K, N]
    return 2 * 8192**3 / time_cuda(lambda: a @ b, 20)


def report(res: dict[str, Any], path: str | None) -> None:
    print(json.dumps(res, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
