"""Tensor parallelism through the executor (its rank processes; NCCL on a machine with 2 GPUs, else gloo on CPU):
TP=2 gives the same greedy tokens as TP=1 and as transformers."""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import assert_all_free, device_for_tp
from tests.conftest import generate_greedy as _generate
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


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_equals_tp1(models: dict[str, pathlib.Path]) -> None:
    """TP 2 over NCCL (Triton attention, eager decode: graphs are off for TP > 1) against TP 1 with graphs."""
    model = models["qwen2"]
    prompts = random_prompts(5, [1, 17, 64, 130, 200], 512, seed=303)
    tp1, llm = _generate(model, prompts, 24, device="cuda")
    assert llm.engine.executor.runner.graphs is not None
    llm.shutdown()
    tp2, llm = _generate(model, prompts, 24, device="cuda", tensor_parallel_size=2)
    assert llm.engine.executor.runner.graphs is None
    assert llm.engine.executor.runner.attn.name == "triton"
    assert_all_free(llm.engine)
    llm.shutdown()
    assert tp2 == tp1
