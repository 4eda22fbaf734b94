"""What the engine hands back: one RequestOutput per request per step that produced something."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.logprobs import TokenLogprob


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
    # One per new token when the request asked for logprobs (None for a token sampled elsewhere: the first token
    # of a prompt whose KV a prefill instance computed); None when it did not ask
    new_logprobs: list[TokenLogprob | None] | None = None
    # The KV connector's hand-off of a finished request whose blocks it holds for a reader (the prefill role:
    # a kv_transfer.KVHandle); None otherwise. See engine/kv_connector.py.
    kv_handoff: Any | None = None
    kv_load_failed: bool = False  # the prompt's KV was to be loaded from elsewhere, and was computed here instead
