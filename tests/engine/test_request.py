"""Request: the token-level stop rules (EOS, stop tokens, max_tokens, max_model_len), the async-scheduling
placeholder and its resolution, and the "next token ends it" prediction; stop tokens end a real generation."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.block_hash import hash_blocks
from engine.request import PLACEHOLDER, Request, RequestStatus
from tests.model_factory import random_prompts


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    prompt = random_prompts(1, [30], 512, seed=33)[0]
    free_run = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].token_ids
    stop_at = free_run[5]
    first = free_run.index(stop_at)
    out = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop_at],
                                              ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == free_run[: first + 1]


def req(max_tokens: int = 16, max_model_len: int = 1 << 30, eos: tuple[int, ...] = (2,), **kwargs: object) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)  # type: ignore[arg-type]
    return Request("r", [5, 6, 7], params, 0, eos_token_ids=eos, max_model_len=max_model_len)


def after(r: Request, *tokens: int) -> list[RequestStatus | None]:
    """The stop verdict after each appended token."""
    verdicts = []
    for t in tokens:
        r.append_token(t)
        verdicts.append(r.check_stop())
    return verdicts


def test_eos_stops_unless_ignored() -> None:
    r = req()
    assert after(r, 9, 2) == [None, RequestStatus.FINISHED_STOPPED] and r.stop_reason == 2
    r = req(ignore_eos=True)
    assert after(r, 2, 2) == [None, None] and r.stop_reason is None


def test_stop_token_ids_stop_even_when_eos_is_ignored() -> None:
    r = req(stop_token_ids=[11, 13], ignore_eos=True)
    assert after(r, 9, 2, 13) == [None, None, RequestStatus.FINISHED_STOPPED] and r.stop_reason == 13


def test_length_by_max_tokens_and_by_max_model_len() -> None:
    r = req(max_tokens=3)
    assert after(r, 9, 9, 9) == [None, None, RequestStatus.FINISHED_LENGTH] and r.stop_reason is None
    r = req(max_model_len=5)  # 3 prompt tokens: the second output reaches 5
    assert after(r, 9, 9) == [None, RequestStatus.FINISHED_LENGTH]


def test_a_stop_token_on_the_last_allowed_token_is_a_stop_not_a_length() -> None:
    r = req(max_tokens=2, stop_token_ids=[11])
    assert after(r, 9, 11) == [None, RequestStatus.FINISHED_STOPPED] and r.stop_reason == 11


def test_finishes_by_length_after_next() -> None:
    assert req(max_tokens=1).finishes_by_length_after_next()  # the prefill role's one token
    r = req(max_tokens=3)
    assert not r.finishes_by_length_after_next()
    r.append_token(9)
    assert not r.finishes_by_length_after_next()  # the next token is the second
    r.append_token(9)
    assert r.finishes_by_length_after_next()  # the next token is the third
    r = req(max_model_len=5)
    r.append_token(9)  # 4 tokens: the next reaches max_model_len
    assert r.finishes_by_length_after_next()
    assert not req(max_model_len=6).finishes_by_length_after_next()


def test_placeholder_counts_but_never_reaches_a_hash_and_resolves_in_place() -> None:
    r = Request("r", list(range(3, 18)), SamplingParams(max_tokens=4), 0)  # 15 prompt tokens, block_size 4
    r.append_placeholder()
    assert r.num_tokens == 16 and r.all_token_ids[-1] == PLACEHOLDER and r.output_token_ids == []
    r.update_block_hashes(4, "salt")
    assert r.block_hashes == hash_blocks(list(range(3, 18)), 4, "salt")  # 3 blocks: the 4th holds the placeholder
    with pytest.raises(AssertionError, match="at most one token in flight"):
        r.append_placeholder()
    r.resolve_token(99)
    assert r.all_token_ids[-1] == 99 and r.output_token_ids == [99] and r.num_pending == 0 and r.num_tokens == 16
    r.update_block_hashes(4, "salt")
    assert r.block_hashes == hash_blocks([*range(3, 18), 99], 4, "salt")  # extended by the now-real 4th block


def test_a_seed_gives_the_request_its_own_generator() -> None:
    a, b = req(seed=7), req(seed=7)
    assert a.generator is not None and a.generator is not b.generator
    assert a.generator.initial_seed() == 7 and req().generator is None
