"""What a rank's transfer agent reports about one read (it crosses from the TP rank processes to the driver, so
it is plain picklable data: an enum, a typed error, numbers)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kv_transfer.errors import KVTransferError, PeerGoneError


class ReadStatus(enum.Enum):
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class ReadState:
    status: ReadStatus
    error: KVTransferError | None = None  # set when FAILED

    @staticmethod
    def failed(error: KVTransferError) -> ReadState:
        return ReadState(ReadStatus.FAILED, error)


IN_FLIGHT = ReadState(ReadStatus.IN_FLIGHT)
DONE = ReadState(ReadStatus.DONE)


@dataclass(frozen=True)
class ReadStats:
    """A finished read's size on one rank."""

    num_bytes: int = 0
    num_descriptors: int = 0
    local_bytes: int = 0  # of num_bytes, copied from a same-host peer's mapped memory (kv_transfer.local_copy)
    local_copy_fallbacks: int = 0  # parts that could not go the fast local way: unmapped peer, slower copy


def error_from(e: BaseException) -> KVTransferError:
    """A NIXL/UCX exception as a typed error: a lost peer (disconnect, unreachable) or an internal failure."""
    if isinstance(e, KVTransferError):
        return e
    text = f"{type(e).__name__} {e}".lower()
    cls = PeerGoneError if "disconnect" in text or "remote" in text or "unreach" in text else KVTransferError
    return cls(f"{type(e).__name__}: {e}")
