"""What a transfer agent tells its peers about itself: versioned plain data (JSON), never pickle.

It travels through the metadata store and the router, so it must be safe to parse from an untrusted source:
`AgentDescriptor.from_json` checks the version, every field's type, and nothing in it is ever executed.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.kv_heads import KVHeadSplit
from kv_transfer.errors import IncompatibleKVError

PROTOCOL_VERSION = 1
LAYOUT = "layer_group,block,kv_head,layer,kv,token,dim"
# added to version 1 later: an older peer's descriptor lacks them
OPTIONAL_FIELDS = ("node_ip", "num_layer_groups", "share")


def same_node(a: AgentDescriptor, b: AgentDescriptor) -> bool:
    """Whether two agents share a node: by node IP where both know theirs (two nodes may share a hostname, e.g.
    network namespaces or containers), else by hostname."""
    if a.node_ip and b.node_ip:
        return a.node_ip == b.node_ip
    return a.host == b.host


@dataclass(frozen=True)
class AgentDescriptor:
    version: int
    engine_id: str
    agent_name: str
    agent_metadata: bytes  # NIXL agent metadata (base64 on the wire)
    mem_type: str  # "DRAM" or "VRAM"
    device_id: int
    base_addr: int
    num_blocks: int
    block_size: int  # tokens per block
    block_bytes: int  # bytes of one block in one layer group (group g, block b at base + (g·num_blocks + b)·this)
    head_bytes: int  # bytes of one KV head of one block in one layer group (its layers, K and V)
    num_kv_heads: int  # on this rank
    total_kv_heads: int
    num_layers: int
    head_dim: int
    tp_rank: int
    tp_size: int
    dtype: str
    model_fingerprint: str
    host: str = ""  # hostname: tells a same-host path (shm, cuda_ipc) from a cross-node one (RDMA)
    node_ip: str = ""  # the node's address as Ray sees it (engine.envs.PDSERVE_NODE_IP); "" when unknown
    num_layer_groups: int = 1  # the cache's layer groups (engine/kv_cache.py): the unit of layer-wise streaming
    share: str = ""  # how a same-host reader may map the cache ("memfd:PID:FD", kv_transfer/local_copy.py); "": not
    layout: str = LAYOUT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["agent_metadata"] = base64.b64encode(self.agent_metadata).decode()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AgentDescriptor:
        if not isinstance(d, dict):
            raise ValueError("agent descriptor must be a JSON object")
        if d.get("version") != PROTOCOL_VERSION:
            raise IncompatibleKVError(f"agent descriptor version {d.get('version')!r}; this worker speaks "
                                      f"version {PROTOCOL_VERSION}")
        values: dict[str, Any] = {}
        for f in fields(AgentDescriptor):
            if f.name not in d and f.name in OPTIONAL_FIELDS:
                continue  # NOTE: a peer of an earlier release: the field keeps its default
            if f.name not in d:
                raise ValueError(f"agent descriptor lacks field {f.name!r}")
            v = d[f.name]
            if f.name == "agent_metadata":
                if not isinstance(v, str):
                    raise ValueError("agent descriptor field 'agent_metadata' must be base64 text")
                v = base64.b64decode(v, validate=True)
            elif f.type in ("int", int) and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"agent descriptor field {f.name!r} must be an integer")
            elif f.type in ("str", str) and not isinstance(v, str):
                raise ValueError(f"agent descriptor field {f.name!r} must be a string")
            values[f.name] = v
        return AgentDescriptor(**values)

    @staticmethod
    def from_json(text: str | bytes) -> AgentDescriptor:
        return AgentDescriptor.from_dict(json.loads(text))


def check_compatible(local: AgentDescriptor, remote: AgentDescriptor) -> None:
    """Refuse to pair workers whose KV is not interchangeable; the message names what differs."""
    for name in ("model_fingerprint", "dtype", "layout", "block_size", "num_layers", "head_dim",
                 "total_kv_heads", "num_layer_groups"):
        a, b = getattr(local, name), getattr(remote, name)
        if a != b:
            raise IncompatibleKVError(f"cannot pair KV caches: {name} differs (local {a!r}, remote {b!r})")
    if local.head_bytes != remote.head_bytes:
        raise IncompatibleKVError(f"cannot pair KV caches: head_bytes differs ({local.head_bytes} vs "
                                  f"{remote.head_bytes})")
    for side in (local, remote):
        try:
            heads = KVHeadSplit(side.total_kv_heads, side.tp_size, side.tp_rank)
        except ValueError as e:
            raise IncompatibleKVError(f"{side.agent_name}: {e}") from None
        if side.num_kv_heads != heads.count:
            raise IncompatibleKVError(f"{side.agent_name}: holds {side.num_kv_heads} KV heads; {heads.count} expected "
                                      f"of {side.total_kv_heads} over TP {side.tp_size}")
