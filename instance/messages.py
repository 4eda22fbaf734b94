"""The values that cross the router <-> role-actor boundary (Ray pickles them as they are).

    router --prefill(request_id, prompt, SamplingParams)--> PrefillActor  --> PrefillDone
    router --generate(request_id, prompt, SamplingParams, KVHandle | None)--> DecodeActor --> StreamDelta, ...

NOTE: typed values, not dicts: a renamed field fails where it is built, not as a KeyError in another process.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.logprobs import TokenLogprob
from kv_transfer.handle import KVHandle


@dataclass(frozen=True)
class PrefillDone:
    """A prefill instance ran the prompt to its first token and holds its KV for a reader."""

    kv_handle: KVHandle | None  # where the prompt's KV is, and the first token; None: aborted there
    # The first token's logprob when the request asked for logprobs (the decode instance does not sample it)
    first_logprob: TokenLogprob | None = None

    @property
    def aborted(self) -> bool:
        return self.kv_handle is None


@dataclass(frozen=True)
class StreamDelta:
    """One item of a decode stream: the tokens of one or more engine steps, in order (several when the router
    lagged and the actor merged its outputs: decode_worker/stream.py)."""

    token_ids: list[int]
    text: str  # the text these tokens added
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the final item
    cached_tokens: int = 0  # prompt tokens the decode instance served from its prefix cache
    transferred_blocks: int = 0  # KV blocks pulled from the prefill instance (set on the final item)
    # One per token of token_ids when the request asked for logprobs, else None. An entry is None for a token
    # this instance did not sample: the first token of a prompt prefilled elsewhere (PrefillDone carries it).
    logprobs: list[TokenLogprob | None] | None = None
    kv_load_failed: bool = False  # final item: the KV pull failed and this instance prefilled the prompt itself
