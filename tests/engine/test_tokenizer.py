"""Prompt encoding (text through tokenizer.json, ids as they are) and the incremental detokenizer: text deltas,
incomplete UTF-8 held back, stop strings (also across deltas) cutting the text; stop strings end a real
generation."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from engine.tokenizer import IncrementalDetokenizer, encode_prompt, load_tokenizer
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


TOKENIZER = build_tokenizer()


def test_deltas_add_up_to_the_whole_decode_and_a_split_character_waits() -> None:
    ids = TOKENIZER.encode("naïve café 🙂").ids  # "ï", "é" are two byte tokens each, the emoji four
    detok = IncrementalDetokenizer(TOKENIZER, [])
    texts = []
    for i in ids:
        assert detok.add(i) is None
        texts.append(detok.text)
        assert "\ufffd" not in detok.text  # a partial character is never emitted
    assert detok.text == "naïve café 🙂" == TOKENIZER.decode(ids)
    assert texts[2] == "na" and texts[3] == "naï"  # held back for one token, then emitted whole
    assert texts[-4:] == ["naïve café "] * 3 + ["naïve café 🙂"]


def test_flush_renders_an_unfinished_character() -> None:
    emoji = TOKENIZER.encode("🙂").ids
    assert len(emoji) == 4
    detok = IncrementalDetokenizer(TOKENIZER, [])
    for i in [*TOKENIZER.encode("ok ").ids, *emoji[:2]]:
        detok.add(i)
    assert detok.text == "ok "
    detok.flush()
    assert detok.text == "ok \ufffd"
    detok.flush()  # idempotent
    assert detok.text == "ok \ufffd"


def test_a_stop_string_across_deltas_cuts_the_text_at_the_token_completing_it() -> None:
    ids = TOKENIZER.encode("Hello, world! How are you?").ids  # H e ll o , Ġwor l d ...
    detok = IncrementalDetokenizer(TOKENIZER, ["lo, wo", "you"])
    results = [detok.add(i) for i in ids[:6]]
    assert results == [None] * 5 + ["lo, wo"]  # "lo, wo" spans "ll", "o", ",", " wor"
    assert detok.text == "Hel"


def test_the_earliest_stop_in_the_text_wins_not_the_first_listed() -> None:
    detok = IncrementalDetokenizer(TOKENIZER, ["or", "o, w"])
    results = [detok.add(i) for i in TOKENIZER.encode("Hello, wor").ids]
    assert results[-1] == "o, w" and results[:-1] == [None] * 5  # " wor" completes both; "o, w" starts first
    assert detok.text == "Hell"


def test_without_a_tokenizer_there_is_no_text_and_no_stop(tmp_path: pathlib.Path) -> None:
    detok = IncrementalDetokenizer(None, ["a"])
    assert [detok.add(i) for i in (5, 6)] == [None, None] and detok.text == "" and detok.ids == [5, 6]
    detok.flush()
    assert detok.text == ""
    assert load_tokenizer(str(tmp_path)) is None
