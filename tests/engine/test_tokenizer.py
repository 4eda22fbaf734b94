"""Prompt encoding (text through tokenizer.json, ids as they are) and the incremental detokenizer: text deltas,
incomplete UTF-8 held back, stop strings (also across deltas) cutting the text; stop strings end a real
generation."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from engine.tokenizer import encode_prompt, load_tokenizer
from tests.model_factory import build_tokenizer, random_prompts


@pytest.fixture
def model(models: dict[str, pathlib.Path]) -> pathlib.Path:
    return models["llama"]


def test_stop_string_cuts_text(llm: LLM) -> None:
    tok = build_tokenizer()
    prompt = random_prompts(1, [25], 512, seed=34)[0]
    free = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert free.text == tok.decode(free.token_ids)
    assert len(free.text) > 12
    stop = free.text[8:11]
    cut = free.text.index(stop)
    out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:cut]
    assert stop not in out.text
    # Generation stopped at the token that completed the stop string, not later.
    assert len(out.token_ids) < len(free.token_ids)
    assert tok.decode(out.token_ids[:-1]).find(stop) == -1 and stop in tok.decode(out.token_ids)


def test_text_prompt_round_trip(llm: LLM) -> None:
    out = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt_token_ids == build_tokenizer().encode("The quick brown fox").ids
    assert len(out.token_ids) == 5


def test_encode_prompt(model: pathlib.Path) -> None:
    tokenizer = load_tokenizer(str(model))
    assert encode_prompt(tokenizer, [3, 4]) == [3, 4]
    ids = encode_prompt(tokenizer, "hello world")
    assert ids and ids == tokenizer.encode("hello world", add_special_tokens=True).ids
    with pytest.raises(ValueError, match=r"no tokenizer\.json; pass prompt token ids"):
        encode_prompt(None, "hello")
    assert encode_prompt(None, (1, 2)) == [1, 2]  # type: ignore[arg-type]
