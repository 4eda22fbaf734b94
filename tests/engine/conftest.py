"""Fixtures of the engine's tests: `llm`, an LLM over the tiny llama checkpoint (float32, CPU unless a GPU is
there), checked for leaked blocks when the test ends."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM
from tests.conftest import assert_all_free


@pytest.fixture
def llm(models: dict[str, pathlib.Path]):
    with LLM(model=str(models["llama"]), dtype="float32", max_num_batched_tokens=128) as llm:
        yield llm
        assert_all_free(llm.engine)
