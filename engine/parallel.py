"""Tensor-parallel group state: one process per rank, torch.distributed (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1


_group = TPGroup()


def tp() -> TPGroup:
    return _group


TP_TIMEOUT = timedelta(seconds=300)


def rendezvous_store(host: str, size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on a port the OS picks as it binds: ranks 1..N-1 join at
    tcp://{host}:{store.port}. NOTE: not a port found free beforehand: another process (any outgoing connection
    takes an ephemeral port) could take it before the store binds, which failed a group's start here
    (EADDRINUSE) on a loaded machine."""
    return dist.TCPStore(host, 0, size, is_master=True, timeout=TP_TIMEOUT, wait_for_workers=False)


def init_tp(rank: int, size: int, init_method: str, device: str, store: dist.Store | None = None) -> TPGroup:
    """Join the TP process group. Every rank must call this with the same `init_method` and `size`; rank 0 passes
    the `store` behind it (rendezvous_store)."""
    global _group
    if size > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            # NOTE: ranks that share this machine's visible GPUs (spawned processes) take cuda:rank; a rank whose
            # process sees only its own GPU (a Ray actor with num_gpus=1: CUDA_VISIBLE_DEVICES names one) takes
            # cuda:0, whatever its rank.
            count = torch.cuda.device_count()
            torch.cuda.set_device(0 if count == 1 else rank % count)
        if store is None:  # NOTE: the same store on every rank, so that their keys agree (no prefix of torch's)
            host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
            store = dist.TCPStore(host, int(port), size, is_master=False, timeout=TP_TIMEOUT)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TP_TIMEOUT)
    _group = TPGroup(rank, size)
    return _group


def destroy_tp() -> None:
    global _group
    if dist.is_initialized():
        dist.destroy_process_group()
    _group = TPGroup()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _group.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on each rank -> [..., size * n], rank-major."""
    if _group.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_group.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` (an address of this machine) now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
