"""KVHandle: what a prefill-only run hands to the decode side (plain JSON): where the prompt's KV is and the
first token."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class KVHandle:
    engine_id: str  # the prefill engine holding the blocks
    request_id: str  # its request id there (the key of the held blocks and of the release message)
    block_ids: list[int]  # blocks covering the prompt, in token order
    num_tokens: int  # prompt tokens whose KV the blocks hold
    first_token: int  # sampled by the prefill worker
    agents: list[dict[str, Any]]  # AgentDescriptor.to_dict() of every prefill TP rank
    finished: bool = False  # the first token already ended the request (EOS, stop, max_tokens=1)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> KVHandle:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("KV handle must be a JSON object")
        try:
            return KVHandle(
                engine_id=str(d["engine_id"]), request_id=str(d["request_id"]),
                block_ids=[int(b) for b in d["block_ids"]], num_tokens=int(d["num_tokens"]),
                first_token=int(d["first_token"]), agents=list(d["agents"]), finished=bool(d.get("finished")),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed KV handle: {e}") from None
