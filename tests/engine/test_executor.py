"""Tensor parallelism (NCCL on a machine with 2 GPUs, else gloo on CPU): TP=2 gives the same greedy tokens as
TP=1 and as transformers."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, EngineConfig, SamplingParams
from tests.conftest import assert_all_free, device_for_tp
from tests.model_factory import hf_greedy, random_prompts


def test_tp2_equals_tp1(models: dict[str, pathlib.Path]) -> None:
    model = models["qwen2"]  # q/k/v bias: the bias must be sharded with its rows
    prompts = random_prompts(5, [1, 17, 64, 130, 200], 512, seed=20)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    with LLM(model=str(model), dtype="float32", tensor_parallel_size=1, device=device_for_tp(2)) as llm:
        tp1 = [o.token_ids for o in llm.generate(prompts, params)]
        assert_all_free(llm.engine)
    with LLM(model=str(model), dtype="float32", tensor_parallel_size=2, max_num_batched_tokens=96,
             device=device_for_tp(2)) as llm:
        tp2 = [o.token_ids for o in llm.generate(prompts, params)]
        assert_all_free(llm.engine)
        assert llm.engine.executor.runner.layout.num_kv_heads == 1  # 2 KV heads split over 2 ranks
    assert tp2 == tp1
    assert tp1 == [hf_greedy(model, p, 32) for p in prompts]


def test_tp2_tied_embeddings(models: dict[str, pathlib.Path]) -> None:
    model = models["llama_tied_rope3"]
    prompts = random_prompts(2, [5, 90], 512, seed=21)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with LLM(model=str(model), dtype="float32", tensor_parallel_size=2, device=device_for_tp(2)) as llm:
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        assert_all_free(llm.engine)
    assert outs == [hf_greedy(model, p, 16) for p in prompts]


@pytest.mark.parametrize("size", [3, 4, 16])
def test_tp_size_the_heads_do_not_allow_is_refused(models: dict[str, pathlib.Path], size: int) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model=str(models["llama"]), tensor_parallel_size=size)
