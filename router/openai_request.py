"""An OpenAI-compatible request body (JSON, already decoded) as typed values: `parse_completion` for
/v1/completions, `parse_chat` for /v1/chat/completions. Pure functions: an unusable body raises ApiError with
the HTTP status and the offending parameter, which the front (openai_api.py) returns as OpenAI's error JSON.

Supported: model, prompt (one text or one list of token ids), messages (text content), max_tokens (chat:
max_completion_tokens too), temperature, top_p, seed, stop, stream, stream_options.include_usage, n = 1, and
logprobs (completions: `logprobs: k`; chat: `logprobs: true` with `top_logprobs: k`; k <= 20), and three
extensions: top_k, ignore_eos, priority ("interactive", the default, or "batch": engine/priority.py). Refused
with 400: n > 1, echo, best_of > 1, non-zero penalties, batches of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.priority import Priority
from engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from router.chat_template import ChatMessage


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | list[int] | list[ChatMessage]  # chat: the messages, rendered by the front
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_value" if param else None)


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """The field, None when absent or null; a value of another JSON type is a 400."""
    value = body.get(name)
    # NOTE: JSON true/false are Python bools, which are ints too: refuse them where a number is meant
    if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        raise _bad(f"'{name}' must be {what}, got {value!r}", name)
    return value


def _model(body: Any, served: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", "model", "missing_required_parameter")
    if model != served:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{served}'", "model",
                       "model_not_found")
    return body


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if _get(body, "n", (int,), "an integer") not in (None, 1):
        raise _bad("only n = 1 is supported", "n")
    if body.get("echo"):
        raise _bad("echo is not supported", "echo")
    if _get(body, "best_of", (int,), "an integer") not in (None, 1):
        raise _bad("only best_of = 1 is supported", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), "a number") not in (None, 0):
            raise _bad(f"{name} is not supported", name)


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    """/v1/completions: `logprobs: k` (0 <= k <= 20): each token's logprob and the k most likely."""
    k = _get(body, "logprobs", (int,), "an integer")
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise _bad(f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {k}", "logprobs")
    return k


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """/v1/chat/completions: `logprobs: true`, and `top_logprobs: k` (0 <= k <= 20) that needs it."""
    on = _get(body, "logprobs", (bool,), "a boolean")
    k = _get(body, "top_logprobs", (int,), "an integer")
    if k is not None and not on:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise _bad(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {k}", "top_logprobs")
    return (k or 0) if on else None


def _priority(body: dict[str, Any]) -> Priority:
    name = _get(body, "priority", (str,), "a string")
    try:
        return Priority.INTERACTIVE if name is None else Priority.parse(name)
    except ValueError as e:
        raise _bad(str(e), "priority") from None


def _params(body: dict[str, Any], default_max_tokens: int, max_tokens_names: tuple[str, ...],
            logprobs: int | None) -> SamplingParams:
    max_tokens = default_max_tokens
    for name in max_tokens_names:
        value = _get(body, name, (int,), "an integer")
        if value is not None:
            max_tokens = value
            break
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs, "priority": _priority(body)}
    for name, kinds, what in (("temperature", (int, float), "a number"), ("top_p", (int, float), "a number"),
                              ("seed", (int,), "an integer"), ("top_k", (int,), "an integer"),
                              ("ignore_eos", (bool,), "a boolean")):
        value = _get(body, name, kinds, what)
        if value is not None:
            kwargs[name] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise _bad("'stop' must be a string or a list of up to 4 strings", "stop")
        kwargs["stop"] = stop
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:  # SamplingParams names the field first: "max_tokens must be ..."
        raise _bad(str(e), str(e).split(" ", 1)[0]) from None


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_get(body, "stream", (bool,), "a boolean"))
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise _bad("'stream_options' is an object, allowed only with stream: true", "stream_options")
    include = bool(options and _get(options, "include_usage", (bool,), "a boolean"))
    return stream, include


def parse_completion(body: Any, served_model: str) -> CompletionRequest:
    """POST /v1/completions. The default max_tokens is 16, as OpenAI's."""
    body = _model(body, served_model)
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise _bad("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string or a list of token ids", "prompt")
    stream, include = _stream(body)
    params = _params(body, 16, ("max_tokens",), _completion_logprobs(body))
    return CompletionRequest(served_model, prompt, params, stream, include)


def parse_chat(body: Any, served_model: str, max_model_len: int) -> CompletionRequest:
    """POST /v1/chat/completions. Without max_tokens the answer may run to the end of the context."""
    body = _model(body, served_model)
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}].role")
        parsed.append(ChatMessage(m["role"], _content(m.get("content"), i)))
    stream, include = _stream(body)
    params = _params(body, max_model_len, ("max_completion_tokens", "max_tokens"), _chat_logprobs(body))
    return CompletionRequest(served_model, parsed, params, stream, include)


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts (other part types are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
