"""Wire to typed values: prompts (text or ids) validated as the engine validates them, SamplingParams with
unset fields at their defaults, worker errors to statuses by type."""

from __future__ import annotations

import grpc
import pytest

import api.v1.pdserve_pb2 as pb
from engine.errors import NoKVSpaceError
from engine.model_info import ModelInfo
from engine.sampling_params import SamplingParams
from router.request import prompt_tokens, sampling_params, worker_error_status
from tests.model_factory import build_tokenizer

INFO = ModelInfo(model="/m", vocab_size=512, max_model_len=64, block_size=16, hash_salt="s",
                 eos_token_ids=(2,), dtype="float32")


def test_text_is_encoded_as_the_engine_encodes_it() -> None:
    tokenizer = build_tokenizer()
    ids = prompt_tokens(pb.GenerateRequest(text="hello world"), tokenizer, INFO)
    assert ids == tokenizer.encode("hello world", add_special_tokens=True).ids
    with pytest.raises(ValueError, match="no tokenizer"):
        prompt_tokens(pb.GenerateRequest(text="hello"), None, INFO)


def test_token_ids_are_validated() -> None:
    assert prompt_tokens(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 511])), None, INFO) == [1, 511]
    with pytest.raises(ValueError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        prompt_tokens(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 512])), None, INFO)
    with pytest.raises(ValueError, match="at most 63 prompt tokens fit"):
        prompt_tokens(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 64)), None, INFO)
    with pytest.raises(ValueError, match="neither text nor token_ids"):
        prompt_tokens(pb.GenerateRequest(), None, INFO)


def test_unset_sampling_fields_take_the_defaults() -> None:
    assert sampling_params(pb.SamplingParams()) == SamplingParams()
    sp = sampling_params(pb.SamplingParams(temperature=0.0, top_k=0, seed=7, stop=["\n"], stop_token_ids=[3]))
    assert (sp.temperature, sp.top_k, sp.seed, sp.stop, sp.stop_token_ids) == (0.0, 0, 7, ["\n"], [3])
    assert sp.max_tokens == SamplingParams().max_tokens
    with pytest.raises(ValueError, match="max_tokens"):
        sampling_params(pb.SamplingParams(max_tokens=0))  # set to zero is not unset


def test_worker_errors_by_type_not_text() -> None:
    assert worker_error_status(NoKVSpaceError("x")) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "x")
    assert worker_error_status(ValueError("y")) == (grpc.StatusCode.INVALID_ARGUMENT, "y")
    assert worker_error_status(RuntimeError("no KV blocks")) is None
    assert worker_error_status(None) is None


def test_text_over_the_byte_cap_is_refused_before_tokenizing() -> None:
    class Refuses:  # a tokenizer that must not be reached
        def encode(self, *a: object, **k: object) -> None:
            raise AssertionError("tokenized a prompt over the cap")

    text = "é" * 15  # 30 UTF-8 bytes: the cap counts bytes, not characters
    with pytest.raises(ValueError, match=r"text prompt is 30 bytes; at most 29 .*server.max_prompt_bytes"):
        prompt_tokens(pb.GenerateRequest(text=text), Refuses(), INFO, max_prompt_bytes=29)  # type: ignore[arg-type]
    tokenizer = build_tokenizer()
    assert prompt_tokens(pb.GenerateRequest(text=text), tokenizer, INFO, max_prompt_bytes=30)
