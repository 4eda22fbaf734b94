"""Typed failures of a KV transfer. Every one of them is recoverable by the decode side computing the prefill
itself (which it logs and counts)."""

from __future__ import annotations


class KVTransferError(RuntimeError):
    """Base class: the KV of a request could not be pulled."""

    kind = "error"  # the suffix of its fallback counter (fallback_<kind>)


class IncompatibleKVError(KVTransferError, ValueError):
    """The two workers' KV caches are not interchangeable (model, dtype, layout or TP head split)."""

    kind = "incompatible"


class PeerGoneError(KVTransferError):
    """The prefill worker disconnected (process died, network gone) before the read completed."""

    kind = "peer"


class TransferTimeoutError(KVTransferError):
    """The read did not complete within the configured bound."""

    kind = "timeout"


class KVReleasedError(KVTransferError):
    """The prefill worker no longer held the blocks (its lease expired or the request was aborted there), so
    whatever was read cannot be trusted."""

    kind = "released"
