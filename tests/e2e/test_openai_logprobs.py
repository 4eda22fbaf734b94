"""Logprobs through the official `openai` SDK on the real tiny CPU cluster: completions (`logprobs: k`) and chat
(`logprobs: true, top_logprobs: k`), streaming and not, equal transformers' log_softmax of the logits for the
same greedy tokens, whether the first token was sampled on the decode instance (a short prompt) or on the
prefill instance (a long one: disaggregated, its logprob carried in PrefillDone)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import openai
import pytest
from tokenizers import Tokenizer

from tests.e2e.serve_process import Server, serve
from tests.e2e.test_openai_api import MESSAGES, chat_prompt_ids
from tests.model_factory import hf_greedy, hf_logprobs, random_prompts

pytestmark = pytest.mark.slow

N, K = 6, 3
TOL = 1e-3  # float32 on both sides; the engine's kernels sum in another order than transformers'


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, models: dict[str, pathlib.Path]) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("logprobs"), models["llama"], {"server": {"http_port": 0}}) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def reference(model: pathlib.Path, prompt: list[int]) -> tuple[list[str], list[float], list[list[tuple[str, float]]]]:
    """transformers' greedy tokens (as text), their logprobs, and the top K (text, logprob) at each position."""
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = hf_greedy(model, prompt, N)
    logp = hf_logprobs(model, prompt, ids)  # [N, V]
    text = [tok.decode([t], skip_special_tokens=False) for t in ids]
    top = [[(tok.decode([t], skip_special_tokens=False), v) for v, t in zip(*(x.tolist() for x in logp[i].topk(K)),
                                                                            strict=True)] for i in range(N)]
    return text, [logp[i, t].item() for i, t in enumerate(ids)], top


@pytest.mark.parametrize("length", [8, 80])  # 80 > placement.max_local_prefill_tokens: prefilled remotely
def test_completion_logprobs_equal_transformers(client: openai.OpenAI, models: dict[str, pathlib.Path],
                                                length: int) -> None:
    prompt = random_prompts(1, [length], 512, seed=length)[0]
    tokens, logprobs, top = reference(models["llama"], prompt)
    args = {"model": "llama", "prompt": prompt, "max_tokens": N, "temperature": 0, "logprobs": K,
            "extra_body": {"ignore_eos": True}}
    raw = client.completions.with_raw_response.create(**args)  # type: ignore[arg-type]
    assert f"disaggregated={str(length > 32).lower()}" in raw.headers["x-pdserve-routing"]
    lp = raw.parse().choices[0].logprobs
    assert lp is not None and lp.tokens == tokens
    assert lp.token_logprobs == pytest.approx(logprobs, abs=TOL)
    assert lp.top_logprobs is not None and len(lp.top_logprobs) == N
    for got, want in zip(lp.top_logprobs, top, strict=True):
        # NOTE: OpenAI's shape is a map by token text: tokens of one partial UTF-8 character share U+FFFD
        assert got == pytest.approx(dict(want), abs=TOL)
    assert lp.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(N)]

    chunks = list(client.completions.create(**args, stream=True))  # type: ignore[call-overload]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == tokens
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(logprobs, abs=TOL)
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset  # continued across chunks


def test_chat_logprobs_equal_transformers(client: openai.OpenAI, models: dict[str, pathlib.Path]) -> None:
    tokens, logprobs, top = reference(models["llama"], chat_prompt_ids(models["llama"]))
    args = {"model": "llama", "messages": MESSAGES, "max_tokens": N, "temperature": 0, "logprobs": True,
            "top_logprobs": K, "extra_body": {"ignore_eos": True}}
    c = client.chat.completions.create(**args)  # type: ignore[call-overload]
    content = c.choices[0].logprobs.content
    assert [e.token for e in content] == tokens
    assert [e.logprob for e in content] == pytest.approx(logprobs, abs=TOL)
    assert [e.bytes for e in content] == [list(t.encode()) for t in tokens]
    for e, want in zip(content, top, strict=True):
        assert [a.token for a in e.top_logprobs] == [t for t, _ in want]
        assert [a.logprob for a in e.top_logprobs] == pytest.approx([v for _, v in want], abs=TOL)

    chunks = list(client.chat.completions.create(**args, stream=True))  # type: ignore[call-overload]
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == tokens
    assert [e.logprob for e in streamed] == pytest.approx(logprobs, abs=TOL)
    assert all(len(e.top_logprobs) == K for e in streamed)


def test_without_logprobs_none_are_returned(client: openai.OpenAI) -> None:
    c = client.completions.create(model="llama", prompt="hello", max_tokens=3, temperature=0)
    assert c.choices[0].logprobs is None
    chat = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=3,  # type: ignore[arg-type]
                                          temperature=0, logprobs=True)
    assert chat.choices[0].logprobs is not None and all(e.top_logprobs == [] for e in chat.choices[0].logprobs.content)
