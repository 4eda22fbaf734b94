"""The OpenAI-compatible HTTP API (issue 18) on the real tiny CPU cluster (real Ray, Redis, NIXL, gRPC), through
the official `openai` SDK: completions and chat, streaming and not, give the greedy text the gRPC API gives for
the same prompt (chat: the prompt transformers' apply_chat_template renders); bad requests get OpenAI's 400/404."""

from __future__ import annotations

import json
import pathlib
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from api.v1 import pdserve_pb2 as pb
from tests.e2e.serve_process import Server, serve

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, models: dict[str, pathlib.Path]) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("openai"), models["llama"], {"server": {"http_port": 0}}) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def grpc_text(srv: Server, prompt: str | list[int]) -> tuple[str, str]:
    """The gRPC API's greedy text and finish reason for the same prompt and max_tokens."""
    sampling = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    req = (pb.GenerateRequest(text=prompt, sampling=sampling) if isinstance(prompt, str)
           else pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling))
    out = list(srv.stub.Generate(req, timeout=60))
    return "".join(m.text for m in out), out[-1].finish_reason


def chat_prompt_ids(model_dir: pathlib.Path) -> list[int]:
    """The chat prompt as transformers renders and tokenizes it (the reference for the router's renderer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_models(srv: Server, client: openai.OpenAI) -> None:
    with urllib.request.urlopen(srv.http_url + "/health", timeout=10) as r:
        assert r.status == 200
    assert [m.id for m in client.models.list().data] == ["llama"]
    assert srv.log.read_text().count("auth: open (no auth section)") == 1  # no keys: said once, at start


def test_completion_equals_grpc_greedy_text(srv: Server, client: openai.OpenAI) -> None:
    want, reason = grpc_text(srv, PROMPT)
    raw = client.completions.with_raw_response.create(model="llama", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                      temperature=0)
    routing = raw.headers["x-pdserve-routing"]
    assert "decode=decode-0" in routing and "reason=" in routing
    c = raw.parse()
    assert c.choices[0].text == want and c.choices[0].finish_reason == reason
    assert c.usage.prompt_tokens > 0 and 0 < c.usage.completion_tokens <= MAX_TOKENS
    assert c.usage.prompt_tokens_details is not None and c.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(client.completions.create(model="llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == c.usage.completion_tokens


def test_chat_equals_grpc_greedy_text_of_the_rendered_prompt(srv: Server, client: openai.OpenAI,
                                                             models: dict[str, pathlib.Path]) -> None:
    ids = chat_prompt_ids(models["llama"])
    want, reason = grpc_text(srv, ids)
    c = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
                                       temperature=0)
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == want and c.choices[0].finish_reason == reason
    assert c.usage is not None and c.usage.prompt_tokens == len(ids)

    chunks = list(client.chat.completions.create(model="llama", messages=MESSAGES,  # type: ignore[arg-type]
                                                 max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == reason


def test_bad_requests_get_openai_errors(srv: Server, client: openai.OpenAI) -> None:
    status, body = post(srv.http_url + "/v1/completions", {"prompt": PROMPT})  # no model
    assert status == 400 and body["error"]["param"] == "model" and body["error"]["message"]
    status, body = post(srv.http_url + "/v1/completions", {"model": "gpt-4", "prompt": PROMPT})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="llama", prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=0)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="llama", prompt=PROMPT, logprobs=21)
    srv.wait_idle()  # nothing was left running on the pools


def test_a_client_gone_mid_stream_aborts_the_request(srv: Server, client: openai.OpenAI) -> None:
    from tests.e2e.test_metrics import scrape, value

    def cancelled() -> float:
        return value(scrape(srv.metrics_url), "pdserve:requests", "pdserve:requests_total", status="CANCELLED") or 0

    before = cancelled()
    stream = client.completions.create(model="llama", prompt=PROMPT, max_tokens=1000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert next(iter(stream)).choices
    stream.close()
    deadline = time.monotonic() + 20
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled() == before + 1  # the router saw the client go and aborted the request on the workers
    srv.wait_idle()


def test_every_router_process_serves_http(tmp_path: pathlib.Path, models: dict[str, pathlib.Path]) -> None:
    """server.routers: 2: the controller's ready line lists both routers' HTTP URLs, and each answers."""
    with serve(tmp_path, models["llama"], {"server": {"routers": 2, "http_port": 0}}) as two:
        assert len(two.http_urls) == 2 and len(set(two.http_urls)) == 2
        want, _ = grpc_text(two, PROMPT)
        for url in two.http_urls:
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
            out = c.completions.create(model="llama", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
            assert out.choices[0].text == want


def test_sse_wire_format_and_routing_header(srv: Server) -> None:
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    req = urllib.request.Request(srv.http_url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert "decode=decode-0" in r.headers["x-pdserve-routing"]
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
