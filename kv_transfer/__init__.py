"""KV-cache transfer from prefill to decode workers over NIXL (UCX): agents, pull protocol, TP re-slicing."""

from kv_transfer import transports
from kv_transfer.config import TransferConfig
from kv_transfer.connector import KVConsumer, KVProducer
from kv_transfer.descriptor import AgentDescriptor, check_compatible
from kv_transfer.errors import (
    IncompatibleKVError,
    KVReleasedError,
    KVTransferError,
    PeerGoneError,
    TransferTimeoutError,
)
from kv_transfer.handle import KVHandle

__all__ = [
    "AgentDescriptor", "IncompatibleKVError", "KVConsumer", "KVHandle", "KVProducer", "KVReleasedError",
    "KVTransferError", "PeerGoneError", "TransferConfig", "TransferTimeoutError", "check_compatible", "transports",
]
