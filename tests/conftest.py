"""Shared fixtures: tiny random checkpoints (built once per session) and the block-accounting check."""

from __future__ import annotations

import os

# NOTE: on a 2-core machine, OpenMP threads that spin while waiting starve any other busy process (a TP rank,
# Ray, Redis): measured 7 s vs 167 s for the same tests. Must be set before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pathlib
from collections.abc import Iterator

import pytest

from engine import LLM, LLMEngine, envs
from tests.model_factory import make_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip without CUDA, except `interpretable` ones under Triton's CPU interpreter."""
    import torch

    if torch.cuda.is_available():
        return
    interpret = envs.TRITON_INTERPRET.get()
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (interpret and "interpretable" in item.keywords):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """Tiny GQA checkpoints (4 query heads, 2 KV heads): llama, qwen2 (q/k/v bias), mistral, llama with tied
    embeddings + llama3 rope; and llama_mqa, a llama with one KV head (multi-query attention)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_tiny_model(root / "llama", "llama", seed=0),
        "qwen2": make_tiny_model(root / "qwen2", "qwen2", seed=1),
        "mistral": make_tiny_model(root / "mistral", "mistral", seed=2),
        "llama_tied_rope3": make_tiny_model(
            root / "llama_tied_rope3", "llama", seed=3, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
        "llama_mqa": make_tiny_model(root / "llama_mqa", "llama", seed=4, num_key_value_heads=1),
    }


def device_for_tp(size: int) -> str:
    """"cuda" when the machine has `size` GPUs, else "cpu" (a TP test then runs over gloo instead of NCCL)."""
    import torch

    return "cuda" if torch.cuda.device_count() >= size else "cpu"


def assert_all_free(engine: LLMEngine) -> None:
    """Block accounting never leaks: with no request in flight, free + cached-free == total, none used."""
    assert not engine.has_unfinished_requests(), f"requests still in flight: {list(engine.requests)}"
    assert not engine.scheduler.waiting and not engine.scheduler.running
    stats = engine.kv.stats()
    assert stats.num_used == 0, stats
    assert stats.num_free + stats.num_cached_free == stats.num_blocks, stats
    assert all(c == 0 for c in engine.kv.pool.ref_cnt)


@pytest.fixture
def engine_factory() -> Iterator:
    """Build engines that are shut down (and checked for leaked blocks) when the test ends."""
    from engine.config import EngineConfig

    made: list[LLMEngine] = []

    def make(model: pathlib.Path, **kwargs: object) -> LLMEngine:
        kwargs.setdefault("dtype", "float32")
        if "num_kv_blocks" not in kwargs:
            # NOTE: a test may hold several engines at once; on a GPU the default budget (a share of free memory)
            # would let the first take the whole device.
            kwargs.setdefault("kv_cache_memory_bytes", 64 << 20)
        engine = LLMEngine(EngineConfig(model=str(model), **kwargs))  # type: ignore[arg-type]
        made.append(engine)
        return engine

    yield make
    for engine in made:
        try:
            assert_all_free(engine)
        finally:
            engine.shutdown()


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step until idle; returns request id -> generated token ids."""
    done: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    raise AssertionError("engine did not finish within max_steps")


def generate_greedy(model: pathlib.Path, prompts: list[list[int]], n: int, **kwargs: object) -> tuple[list, LLM]:
    """`n` greedy tokens per prompt from a fresh float32 LLM; returns (token ids per prompt, the LLM to shut
    down). The GPU tests compare such runs across devices and settings."""
    from engine import LLM, SamplingParams

    llm = LLM(model=str(model), dtype="float32", **kwargs)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)], llm
