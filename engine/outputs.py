"""What the engine hands back: one RequestOutput per request per step that produced something."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every generated token so far
    new_token_ids: list[int]  # generated in this step
    text: str = ""  # detokenized output so far (empty without a tokenizer)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    kv_block_ids: list[int] | None = None  # prefill role (hold_kv): the blocks holding the prompt's KV
    metrics: dict[str, float] = field(default_factory=dict)
