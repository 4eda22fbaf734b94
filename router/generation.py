"""The typed values of one generation request, whichever front it came through: the gRPC service (service.py,
wire.py) and the OpenAI-compatible HTTP front (openai_api.py) both build a `GenerateInput`, run it through
`RouterService.generate` (admission, tokens and hashes, placement, run, release, metrics) and turn the `Output`
items it yields, or the `RequestError` it raises, into their own wire format.

NOTE: the error's kind is a grpc.StatusCode, the vocabulary the router already speaks; the HTTP front maps it
to an HTTP status (openai_errors.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from engine.logprobs import TokenLogprob
from engine.priority import Priority
from engine.sampling_params import SamplingParams
from instance.messages import StreamDelta
from metastore.api_keys import ApiKey
from router.placement import Placement


@dataclass(frozen=True)
class GenerateInput:
    prompt: str | list[int]  # text (tokenized with the model's special tokens) or token ids as they are
    params: SamplingParams
    request_id: str = ""  # "": the router picks one
    timeout_s: float | None = None  # the client's deadline from now; None: none
    api_key: ApiKey | None = None  # the caller's key (router/access.py); None: the server is open
    # Its class (engine/priority.py): the request's own field, overridden by its key's when auth is on. The router
    # puts it into the SamplingParams that travel to the engines (RouterService._generate).
    priority: Priority = Priority.INTERACTIVE


@dataclass(frozen=True)
class Routing:
    """Where and why a request ran."""

    decode_instance: str
    prefill_instance: str  # "": prefilled on the decode instance
    disaggregated: bool
    cached_tokens: int  # on the final item: what the decode instance reused; before: placement's estimate
    transferred_blocks: int
    reason: str
    migrations: int = 0


@dataclass(frozen=True)
class Output:
    """One item of a request's stream. The first item and the final one carry `routing`; the final one has
    `finished` set, its finish reason and the usage."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str = ""  # "stop" | "length" | "abort" on the final item
    prompt_tokens: int = 0  # on the final item
    completion_tokens: int = 0  # on the final item
    routing: Routing | None = None
    # One per token of token_ids when the request asked for logprobs (SamplingParams.logprobs), else None
    logprobs: list[TokenLogprob] | None = None


class RequestError(Exception):
    """A request refused or failed, with the status a client sees (gRPC's code; HTTP maps it)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.retry_after_s = retry_after_s  # a refusal that may pass later: seconds until then (Retry-After)

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, at least 1, for HTTP's Retry-After and gRPC's `retry-after` trailing metadata."""
        return None if self.retry_after_s is None else str(max(1, math.ceil(self.retry_after_s)))


def routing_of(placement: Placement, cached: int, transferred: int, migrations: int) -> Routing:
    return Routing(placement.decode_instance, placement.prefill_instance or "", placement.disaggregated, cached,
                   transferred, placement.reason, migrations)


def final_output(rid: str, last: StreamDelta, prompt_tokens: int, completion: int, placement: Placement,
                 migrations: int = 0, logprobs: list[TokenLogprob] | None = None) -> Output:
    """A request's last item: its last tokens, usage, and where and why it ran. cached_tokens: what the decode
    instance really reused (the index the placement read may lag)."""
    return Output(rid, last.token_ids, last.text, finished=True, finish_reason=last.finish_reason or "",
                  prompt_tokens=prompt_tokens, completion_tokens=completion,
                  routing=routing_of(placement, last.cached_tokens, last.transferred_blocks, migrations),
                  logprobs=logprobs)


def delta_logprobs(delta: StreamDelta, first: TokenLogprob | None) -> list[TokenLogprob] | None:
    """A stream item's logprobs, one per token, with the first token's from the prefill instance (`first`) where
    the decode instance did not sample it. RuntimeError if one is missing: an engine bug, never a silent gap."""
    if delta.logprobs is None:
        return None
    out = [first if lp is None and i == 0 and first is not None else lp for i, lp in enumerate(delta.logprobs)]
    if len(out) != len(delta.token_ids) or any(lp is None for lp in out):
        raise RuntimeError(f"a stream item has logprobs for {sum(lp is not None for lp in out)} of its "
                           f"{len(delta.token_ids)} tokens")
    return out  # type: ignore[return-value]
