"""OpenAI request bodies as typed values: what is accepted, and the 400/404 (with the parameter) for the rest."""

from __future__ import annotations

from typing import Any

import pytest

from router.chat_template import ChatMessage
from router.openai_request import ApiError, parse_chat, parse_completion


def refused(fn: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


def test_completion_fields_become_sampling_params() -> None:
    req = parse_completion({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0, "top_p": 0.5,
                            "seed": 7, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
                            "n": 1, "logprobs": None, "user": "u"}, "m")
    p = req.params
    assert (req.prompt, p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == ("hi", 5, 0, 0.5, 7, ["x"])
    assert req.stream and req.include_usage
    assert parse_completion({"model": "m", "prompt": [[1, 2, 3]]}, "m").prompt == [1, 2, 3]
    assert parse_completion({"model": "m", "prompt": ["one"]}, "m").params.max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "hi"}, 400, "model"),
    ({"model": 3, "prompt": "hi"}, 400, "model"),
    ({"model": "other", "prompt": "hi"}, 404, "model"),
    ({"model": "m"}, 400, "prompt"),
    ({"model": "m", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "m", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "m", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "m", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "m", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": "m", "prompt": "hi", "seed": 1.5}, 400, "seed"),
    ({"model": "m", "prompt": "hi", "stop": ["a", 1]}, 400, "stop"),
    ({"model": "m", "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": "m", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": "m", "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ({"model": "m", "prompt": "hi", "priority": "urgent"}, 400, "priority"),
    ({"model": "m", "prompt": "hi", "priority": 0}, 400, "priority"),
    ({"model": "m", "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
])
def test_bad_completion_bodies(body: dict[str, Any], status: int, param: str) -> None:
    e = refused(parse_completion, body, "m")
    assert (e.status, e.param) == (status, param) and e.message


def test_chat_messages_and_max_tokens() -> None:
    req = parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]}],
                      "max_completion_tokens": 3, "max_tokens": 9}, "m", 128)
    assert req.prompt == [ChatMessage("user", "ab")] and req.params.max_tokens == 3
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "m", 128).params.max_tokens \
        == 128  # no limit asked: up to the context
    assert refused(parse_chat, {"model": "m", "messages": []}, "m", 128).param == "messages"
    assert refused(parse_chat, {"model": "m", "messages": [{"content": "x"}]}, "m", 128).status == 400
    e = refused(parse_chat, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                "m", 128)
    assert e.param == "messages[0].content"
    msgs = [{"role": "u", "content": "x"}]
    assert refused(parse_chat, {"model": "m", "messages": msgs, "top_logprobs": 2}, "m", 128).param == "top_logprobs"
    assert refused(parse_chat, {"model": "m", "messages": msgs, "logprobs": True, "top_logprobs": 21}, "m",
                   128).param == "top_logprobs"
    assert refused(parse_chat, {"model": "m", "messages": msgs, "logprobs": 1}, "m", 128).param == "logprobs"
    assert refused(parse_chat, ["not", "an", "object"], "m", 128).status == 400


def test_logprobs_and_priority_become_sampling_params() -> None:
    from engine.priority import Priority

    msgs = [{"role": "u", "content": "x"}]
    assert parse_completion({"model": "m", "prompt": "hi", "logprobs": 3}, "m").params.logprobs == 3
    assert parse_completion({"model": "m", "prompt": "hi", "logprobs": 0}, "m").params.logprobs == 0
    assert parse_completion({"model": "m", "prompt": "hi"}, "m").params.logprobs is None
    assert parse_chat({"model": "m", "messages": msgs, "logprobs": True}, "m", 9).params.logprobs == 0
    assert parse_chat({"model": "m", "messages": msgs, "logprobs": True, "top_logprobs": 4}, "m", 9).params.logprobs \
        == 4
    assert parse_chat({"model": "m", "messages": msgs, "logprobs": False}, "m", 9).params.logprobs is None
    assert parse_completion({"model": "m", "prompt": "hi"}, "m").params.priority is Priority.INTERACTIVE
    assert parse_chat({"model": "m", "messages": msgs, "priority": "batch"}, "m", 9).params.priority is Priority.BATCH
