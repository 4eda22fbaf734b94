"""The model runner: it refuses an unresolved config, and the configured attention backend and enforce_eager
reach it."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.model_runner import ModelRunner


def test_enforce_eager_and_backend_reach_the_runner(models: dict[str, pathlib.Path]) -> None:
    with LLM(model=str(models["llama"]), dtype="float32", device="cpu", attention_backend="torch",
             enforce_eager=True, kv_cache_memory_bytes=16 << 20) as llm:
        runner = llm.engine.executor.runner
        assert runner.attn.name == "torch" and runner.graphs is None
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        assert len(out[0].token_ids) == 2


def test_the_runner_refuses_an_unresolved_config(models: dict[str, pathlib.Path]) -> None:
    with pytest.raises(ValueError, match=r"EngineConfig\.resolved\(\)"):
        ModelRunner(EngineConfig(model=str(models["llama"])))
