"""The control messages between a reader (decode) and a holder (prefill), sent as NIXL notifications.

    reader ──ReleaseRequest──► holder      "I am done with (or give up on) your request's blocks"
    reader ◄──ReleaseAck────── holder      held=True: the blocks were still held when the read finished

They arrive from another process over the network, so `decode_message` checks every field's type and raises
ValueError for anything malformed; nothing in them is ever executed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ReleaseRequest:
    request_id: str  # the holder's request id (KVHandle.request_id)
    reader: str  # the reader's agent name, to send the ack to
    reader_metadata_b64: str  # the reader's NIXL metadata (connection info only), for a holder that lacks it

    def encode(self) -> bytes:
        return json.dumps({"op": "release", **asdict(self)}).encode()


@dataclass(frozen=True)
class ReleaseAck:
    engine_id: str  # the holder
    request_id: str  # the holder's request id
    held: bool  # False: the holder had already freed the blocks (lease expired, aborted): the read is void

    def encode(self) -> bytes:
        return json.dumps({"op": "ack", **asdict(self)}).encode()


_FIELDS: dict[str, tuple[type, dict[str, type]]] = {
    "release": (ReleaseRequest, {"request_id": str, "reader": str, "reader_metadata_b64": str}),
    "ack": (ReleaseAck, {"engine_id": str, "request_id": str, "held": bool}),
}


def decode_message(raw: bytes) -> ReleaseRequest | ReleaseAck:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("op") not in _FIELDS:
        raise ValueError("not a KV control message (no known 'op')")
    cls, types = _FIELDS[data.pop("op")]
    if set(data) != set(types):
        raise ValueError(f"{cls.__name__} fields {sorted(data)}, expected {sorted(types)}")
    for name, tp in types.items():
        if not isinstance(data[name], tp):
            raise ValueError(f"{cls.__name__}.{name} must be a {tp.__name__}")
    return cls(**data)
