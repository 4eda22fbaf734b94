"""The control messages between a reader (decode) and a holder (prefill), sent as NIXL notifications.

    reader ──ReleaseRequest──► holder      "I am done with (or give up on) your request's blocks"
    reader ◄──ReleaseAck────── holder      held=True: the blocks were still held when the read finished

Layer-wise streaming (kv_transfer/stream.py), holder to the reader it was told to stream to:

    reader ◄──StreamBlocks──── holder      the prompt's blocks, sent when its last chunk is scheduled
    reader ◄──StreamProgress── holder      layer groups [0, groups_done) are written; the last one carries the
                                           first token (all groups written), or aborted=True

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


@dataclass(frozen=True)
class StreamBlocks:
    engine_id: str  # the holder
    request_id: str  # the holder's request id
    block_ids: list[int]  # the prompt's blocks on the holder, in token order
    num_tokens: int  # prompt tokens whose KV they will hold

    def encode(self) -> bytes:
        return json.dumps({"op": "blocks", **asdict(self)}).encode()


@dataclass(frozen=True)
class StreamProgress:
    engine_id: str  # the holder
    request_id: str  # the holder's request id
    groups_done: int  # layer groups [0, groups_done) of every block are written
    first_token: int  # -1 until the prompt is computed (then groups_done is every group)
    aborted: bool  # the holder dropped the request: nothing more comes, the blocks are not held

    def encode(self) -> bytes:
        return json.dumps({"op": "progress", **asdict(self)}).encode()


Message = ReleaseRequest | ReleaseAck | StreamBlocks | StreamProgress

_FIELDS: dict[str, tuple[type, dict[str, type]]] = {
    "release": (ReleaseRequest, {"request_id": str, "reader": str, "reader_metadata_b64": str}),
    "ack": (ReleaseAck, {"engine_id": str, "request_id": str, "held": bool}),
    "blocks": (StreamBlocks, {"engine_id": str, "request_id": str, "block_ids": list, "num_tokens": int}),
    "progress": (StreamProgress, {"engine_id": str, "request_id": str, "groups_done": int, "first_token": int,
                                  "aborted": bool}),
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_message(raw: bytes) -> Message:
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
        v = data[name]
        if not isinstance(v, tp) or (tp is int and not _is_int(v)):
            raise ValueError(f"{cls.__name__}.{name} must be {'an' if tp is int else 'a'} {tp.__name__}")
        if tp is list and not all(_is_int(x) and x >= 0 for x in v):
            raise ValueError(f"{cls.__name__}.{name} must be a list of non-negative integers")
    return cls(**data)
