"""Which UCX transports a transfer path uses, and a loud warning when a fast path fell back to TCP.

UCX chooses among shm (cma, posix, sysv), tcp, rdma (rc, ud, dc) and cuda_ipc per endpoint. The silent fallback
of GPU↔GPU or cross-node traffic to TCP is the most reported performance problem of disaggregated serving, so
every agent logs what it will use at its first transfer, and `tcp_fallback_warnings` counts the warnings.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

tcp_fallback_warnings = 0

_FAST_GPU = ("cuda_ipc", "rc", "dc", "ud", "ib", "gdr_copy", "all")
_FAST_HOST = ("sm", "shm", "cma", "posix", "sysv", "xpmem", "knem", "rc", "dc", "ud", "ib", "self", "all")


def allowed_transports() -> list[str]:
    """The transports UCX may pick (UCX_TLS); ['all'] when unset."""
    tls = os.environ.get("UCX_TLS", "").strip()
    return [t.strip().lstrip("^") for t in tls.split(",") if t.strip()] or ["all"]


def log_selected_transports(local_mem: str, remote_mems: list[str], same_host: bool) -> list[str]:
    """Log the transports allowed for this path; warn (and count) when only TCP can serve a path that has a
    faster transport: VRAM↔VRAM (cuda_ipc/RDMA), host memory on one host (shared memory), or across hosts
    (RDMA). Returns the allowed list."""
    global tcp_fallback_warnings
    tls = allowed_transports()
    excluded = os.environ.get("UCX_TLS", "").startswith("^")
    gpu = local_mem == "VRAM" or any(m == "VRAM" for m in remote_mems)
    fast = _FAST_GPU if gpu else (_FAST_HOST if same_host else _FAST_GPU)
    has_fast = excluded or any(t in fast for t in tls)
    path = f"{local_mem}<-{','.join(sorted(set(remote_mems)))} ({'same host' if same_host else 'cross-node'})"
    if has_fast:
        log.info("KV transfer path %s: UCX transports %s", path, ",".join(tls))
    else:
        tcp_fallback_warnings += 1
        log.warning("KV transfer path %s can only use %s: this is the TCP fallback, expect a small fraction of "
                    "the link's bandwidth. Allow a fast transport in UCX_TLS (kv_transfer.ucx_tls), e.g. %s",
                    path, ",".join(tls), "cuda_ipc,rc" if gpu else "shm,self")
    return tls
