"""From the wire to typed values: a prompt (or a GenerateRequest's) becomes validated prompt ids, the request's
sampling fields SamplingParams, and a worker's error becomes a gRPC status.
Pure functions, no Ray, no I/O: the service calls them per request."""

from __future__ import annotations

from typing import Any

import grpc
from tokenizers import Tokenizer

import api.v1.pdserve_pb2 as pb
from engine.errors import NoKVSpaceError
from engine.model_info import ModelInfo
from engine.sampling_params import SamplingParams
from engine.tokenizer import encode_prompt

# SamplingParams fields that are `optional` in the proto: unset takes SamplingParams' default, not zero.
_OPTIONAL_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos")


def prompt_tokens(request: pb.GenerateRequest, tokenizer: Tokenizer | None, info: ModelInfo,
                  max_prompt_bytes: int = 1 << 20) -> list[int]:
    """A GenerateRequest's prompt as validated token ids (prompt_ids)."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise ValueError("the request has neither text nor token_ids")
    return prompt_ids(request.text if kind == "text" else list(request.token_ids.ids), tokenizer, info,
                      max_prompt_bytes)


def prompt_ids(prompt: str | list[int], tokenizer: Tokenizer | None, info: ModelInfo,
               max_prompt_bytes: int = 1 << 20) -> list[int]:
    """The prompt's token ids, validated as the engine validates them (ValueError: INVALID_ARGUMENT). A text
    prompt over `max_prompt_bytes` (UTF-8) is refused before it is tokenized. NOTE: CPU-bound for a long
    prompt: the service runs it off its event loop."""
    if isinstance(prompt, str):
        size = len(prompt.encode())
        if size > max_prompt_bytes:
            raise ValueError(f"text prompt is {size} bytes; at most {max_prompt_bytes} are accepted "
                             "(server.max_prompt_bytes)")
    tokens = encode_prompt(tokenizer, prompt)
    info.validate_prompt(tokens)
    return tokens


def sampling_params(sp: pb.SamplingParams) -> SamplingParams:
    """Built once here; the actors receive this object as it is (ValueError names a bad field)."""
    kwargs: dict[str, Any] = {name: getattr(sp, name) for name in _OPTIONAL_FIELDS if sp.HasField(name)}
    return SamplingParams(**kwargs, stop=list(sp.stop), stop_token_ids=list(sp.stop_token_ids))


def worker_error_status(cause: BaseException | None) -> tuple[grpc.StatusCode, str] | None:
    """The status for a worker's error that is the client's to fix or retry; None: an internal error.
    `cause` is RayTaskError.cause, which keeps the type the actor raised."""
    if isinstance(cause, ValueError):  # the engine refused the request's input
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause)
    if isinstance(cause, NoKVSpaceError):  # the decode instance's KV cache is full right now
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause)
    return None
