"""KV-transfer settings: timeouts, the prefill side's lease on held KV blocks, and the UCX/NIXL knobs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class TransferConfig:
    transfer_timeout_s: float = 10.0  # a read not done by then fails with TransferTimeoutError
    held_kv_lease_s: float = 30.0  # prefill side frees held blocks if no reader releases them by then
    ack_timeout_s: float = 5.0  # reader waits this long for the holder to confirm it still held the blocks
    stream_timeout_s: float = 60.0  # a streamed load with no word from its prefill instance this long fails
    ucx_tls: str | None = None  # UCX_TLS, e.g. "rc,cuda_ipc,cuda_copy" or "shm,self"; None = UCX decides
    ucx_net_devices: str | None = None  # UCX_NET_DEVICES, e.g. "mlx5_0:1"
    progress_thread: bool | None = None  # NIXL's progress thread; None: on for GPU and non-driver ranks
    parallel_handles: int | None = None  # split a read over this many NIXL transfers; None: 4 on GPU, else 1
    log_transports: bool = True  # log the UCX transport of each read path (warn on a TCP fallback)
    num_threads: int = 0  # UCX backend worker threads (0 = NIXL default)
    max_descriptor_bytes: int = 16 << 20  # cap of a coalesced run (huge single descriptors were slower)
    # Read by block index from descriptor lists prepared once per peer (NIXL prep_xfer_dlist / make_prepped_xfer;
    # NIXL merges adjacent blocks); False builds each read's descriptor list from plan_reads.
    prepared_descriptors: bool = True
    # Same-host peers: the reader maps the holder's KV (memfd on CPU, CUDA IPC on GPU) and copies it itself instead of
    # reading through UCX (cma 0.55-0.65x of memcpy, cuda_ipc 0.4-0.7x of a GPU copy; kv_transfer/local_copy.py).
    # None: on for GPU caches (measured at line rate in the bench and token-exact in a Ray cluster), off on CPU.
    local_copy: bool | None = None
    ucx_env: dict[str, str] = field(default_factory=dict)  # any other UCX_* variable

    def __post_init__(self) -> None:
        if self.transfer_timeout_s <= 0:
            raise ValueError(f"transfer_timeout_s: {self.transfer_timeout_s} must be > 0")
        if self.stream_timeout_s <= 0:
            raise ValueError(f"stream_timeout_s: {self.stream_timeout_s} must be > 0")
        if self.held_kv_lease_s <= 0:
            raise ValueError(f"held_kv_lease_s: {self.held_kv_lease_s} must be > 0")
        if self.parallel_handles is not None and self.parallel_handles < 1:
            raise ValueError(f"parallel_handles: {self.parallel_handles} must be >= 1")
        if self.max_descriptor_bytes <= 0:
            raise ValueError(f"max_descriptor_bytes: {self.max_descriptor_bytes} must be > 0")
        for key in self.ucx_env:
            if not key.startswith("UCX_"):
                raise ValueError(f"ucx_env: {key!r} is not a UCX_* variable")

    def local_copy_for(self, mem_type: str) -> bool:
        """Whether same-host reads (and the share that allows them) are on for a cache in `mem_type`."""
        return self.local_copy if self.local_copy is not None else mem_type == "VRAM"

    def env(self) -> dict[str, str]:
        env = dict(self.ucx_env)
        if self.ucx_tls:
            env["UCX_TLS"] = self.ucx_tls
        if self.ucx_net_devices:
            env["UCX_NET_DEVICES"] = self.ucx_net_devices
        return env

    def apply_env(self) -> None:
        """UCX reads its settings from the environment when the agent is created (in each rank's process)."""
        os.environ.update(self.env())
