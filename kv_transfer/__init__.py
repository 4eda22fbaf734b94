"""KV-cache transfer from prefill to decode workers over NIXL (UCX): agents, pull protocol, TP re-slicing.
The engine uses it through one interface (engine/kv_connector.py); `NixlConnectorSpec` builds it."""

from kv_transfer import transports
from kv_transfer.config import TransferConfig
from kv_transfer.consumer import KVConsumer
from kv_transfer.descriptor import AgentDescriptor, check_compatible
from kv_transfer.errors import (
    IncompatibleKVError,
    KVReleasedError,
    KVTransferError,
    PeerGoneError,
    TransferTimeoutError,
)
from kv_transfer.handle import KVHandle
from kv_transfer.producer import KVProducer
from kv_transfer.spec import NixlConnectorSpec

__all__ = [
    "AgentDescriptor", "IncompatibleKVError", "KVConsumer", "KVHandle", "KVProducer", "KVReleasedError",
    "KVTransferError", "NixlConnectorSpec", "PeerGoneError", "TransferConfig", "TransferTimeoutError",
    "check_compatible", "transports",
]
