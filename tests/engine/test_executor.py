"""Tensor parallelism through the executor (its rank processes; NCCL on a machine with 2 GPUs, else gloo on CPU):
TP=2 gives the same greedy tokens as TP=1 and as transformers; so do replicated KV heads (1 KV head at TP 2, 2 KV
heads at TP 4), whose replicas hold identical KV."""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine import LLM, SamplingParams
from engine.executor import Worker
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
    """TP 2 over NCCL with decode CUDA graphs (their all-reduces captured on both ranks) against TP 1 with graphs,
    and against TP 2 eager."""
    model = models["qwen2"]
    prompts = random_prompts(5, [1, 17, 64, 130, 200], 512, seed=303)
    tp1, llm = _generate(model, prompts, 24, device="cuda")
    assert llm.engine.executor.runner.graphs is not None
    llm.shutdown()
    tp2, llm = _generate(model, prompts, 24, device="cuda", tensor_parallel_size=2)
    runner = llm.engine.executor.runner
    assert runner.attn.name == "triton" and runner.graphs is not None
    assert runner.graphs.replays > 0  # the decode steps ran as graph replays
    assert_all_free(llm.engine)
    llm.shutdown()
    eager, llm = _generate(model, prompts, 24, device="cuda", tensor_parallel_size=2, enforce_eager=True)
    assert llm.engine.executor.runner.graphs is None
    llm.shutdown()
    assert tp2 == tp1 == eager


def _kv_blocks(worker: Worker, n: int) -> torch.Tensor:
    """The first n blocks of a rank's KV cache: [n, G, H_local, L / G, 2, block_size, D] (runs on every rank).
    NOTE: a host copy: a CUDA tensor would cross the process boundary by CUDA IPC, which the executor's pipe does
    not do."""
    return worker.runner.kv_cache.tensor[:, :n].transpose(0, 1).to("cpu", copy=True)


@pytest.mark.parametrize(("model", "size", "replicas"), [("llama_mqa", 2, 2), ("llama", 4, 2)])
def test_tp_above_kv_heads_replicates_them(models: dict[str, pathlib.Path], model: str, size: int,
                                           replicas: int) -> None:
    """1 KV head at TP 2 and 2 KV heads at TP 4: each rank holds the one KV head of its query heads; the tokens
    equal TP 1's and transformers', and replicas of a head hold the same KV as each other and as TP 1."""
    path = models[model]
    # NOTE: no prefix caching: both runs then write the same KV into the same block ids, starting at block 0.
    prompts = random_prompts(3, [1, 33, 70], 512, seed=22)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with LLM(model=str(path), dtype="float32", tensor_parallel_size=1, device="cpu",
             enable_prefix_caching=False) as llm:
        tp1 = [o.token_ids for o in llm.generate(prompts, params)]
        kv1 = _kv_blocks(llm.engine.executor.worker, 9)  # [9, G, H, L / G, 2, bs, D]
    with LLM(model=str(path), dtype="float32", tensor_parallel_size=size, device=device_for_tp(size),
             enable_prefix_caching=False) as llm:
        tpn = [o.token_ids for o in llm.generate(prompts, params)]
        assert_all_free(llm.engine)
        runner = llm.engine.executor.runner
        assert (runner.layout.num_kv_heads, runner.kv_heads.replicas) == (1, replicas)
        # NOTE: the test reads every rank's cache through the executor's own fan-out (no NIXL involved).
        per_rank = llm.engine.executor._on_every_rank(_kv_blocks, 9)  # each [9, G, 1, L / G, 2, bs, D], on the host
    assert tpn == tp1
    assert tp1 == [hf_greedy(path, p, 16) for p in prompts]
    for rank, kv in enumerate(per_rank):
        head = rank // replicas
        assert torch.equal(kv, per_rank[head * replicas]), f"rank {rank} differs from its head's first replica"
        torch.testing.assert_close(kv[:, :, 0], kv1[:, :, head], rtol=1e-4, atol=1e-4)
    assert kv1.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_nccl_mqa_equals_tp1_and_transformers(models: dict[str, pathlib.Path]) -> None:
    """One KV head at TP 2 over NCCL (Triton attention, each rank's 2 query heads on its replica of the head)."""
    model = models["llama_mqa"]
    prompts = random_prompts(5, [1, 17, 64, 130, 200], 512, seed=304)
    tp1, llm = _generate(model, prompts, 24, device="cuda")
    llm.shutdown()
    tp2, llm = _generate(model, prompts, 24, device="cuda", tensor_parallel_size=2)
    runner = llm.engine.executor.runner
    assert runner.attn.name == "triton" and (runner.layout.num_kv_heads, runner.kv_heads.replicas) == (1, 2)
    assert_all_free(llm.engine)
    llm.shutdown()
    assert tp2 == tp1
    assert tp1 == [hf_greedy(model, p, 24) for p in prompts]


def test_watch_sees_a_killed_rank(models: dict[str, pathlib.Path]) -> None:
    """A rank that dies while the engine is idle (no step to notice it) is reported once by `watch_ranks`."""
    import os
    import signal
    import threading

    seen: list[tuple[int, str]] = []
    called = threading.Event()
    with LLM(model=str(models["llama"]), dtype="float32", tensor_parallel_size=2, device="cpu") as llm:
        executor = llm.engine.executor
        executor.watch_ranks(lambda rank, how: (seen.append((rank, how)), called.set()), period_s=0.1)
        assert executor.lost_ranks() == []
        os.kill(executor.ranks[0].proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        assert called.wait(10)
        assert seen == [(1, "exit code -9")]
        with pytest.raises(RuntimeError, match="rank 1: exit code -9"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
