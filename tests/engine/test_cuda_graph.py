"""Decode CUDA graphs: which steps they may replay and the bucket sizes (host logic, runs on CPU); on a GPU,
graph-replayed decodes equal eager ones at every bucket and a step with a 1-token prefill chunk is not replayed."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.cuda_graph import DecodeGraphs, batch_buckets
from engine.model_runner import StepInput
from tests.conftest import assert_all_free
from tests.conftest import generate_greedy as _generate
from tests.model_factory import random_prompts


def _step(q_lens: list[int], sampled: list[int]) -> StepInput:
    n = len(q_lens)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return StepInput(
        input_ids=np.zeros(qsl[-1], np.int64), positions=np.zeros(qsl[-1], np.int64),
        slot_mapping=np.zeros(qsl[-1], np.int64), query_start_loc=qsl, seq_lens=np.full(n, 40, np.int32),
        block_tables=np.zeros((n, 3), np.int32), logits_indices=np.asarray(sampled, np.int64),
        max_query_len=max(q_lens), max_seq_len=40,
    )


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


def test_only_steps_where_every_row_samples_replay() -> None:
    graphs = SimpleNamespace(buckets=batch_buckets(16))
    assert DecodeGraphs.can_run(graphs, _step([1, 1, 1], [0, 1, 2]))  # type: ignore[arg-type]
    # A 1-token chunk of an unfinished prompt beside two decodes: max_query_len is 1, but row 2 samples nothing.
    assert not DecodeGraphs.can_run(graphs, _step([1, 1, 1], [0, 1]))  # type: ignore[arg-type]
    assert not DecodeGraphs.can_run(graphs, _step([1, 5], [0, 1]))  # type: ignore[arg-type]
    assert not DecodeGraphs.can_run(graphs, _step([1] * 17, list(range(17))))  # type: ignore[arg-type]


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_at_every_bucket(models: dict[str, pathlib.Path]) -> None:
    model = models["mistral"]
    buckets = batch_buckets(24)
    assert buckets == [1, 2, 4, 8, 16, 24]
    # 23 prompts: decode batches shrink through odd sizes as requests finish (padding rows in use).
    prompts = random_prompts(23, [5 + 7 * i for i in range(23)], 512, seed=301)
    params = [SamplingParams(max_tokens=4 + i, temperature=0.0, ignore_eos=True) for i in range(23)]
    with LLM(model=str(model), dtype="float32", device="cuda", enforce_eager=True) as llm:
        eager = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.executor.runner.graphs is None
    with LLM(model=str(model), dtype="float32", device="cuda", max_num_seqs=24) as llm:
        graphs = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.executor.runner.graphs.replays > 0
        assert_all_free(llm.engine)
    assert graphs == eager


@pytest.mark.gpu
def test_one_token_prefill_chunks_beside_decodes(models: dict[str, pathlib.Path]) -> None:
    """A 4-token budget makes steps of decodes plus a 1-token chunk of an unfinished prompt: max_query_len 1,
    but not every row samples, so the step must not replay a decode graph."""
    model = models["llama"]
    prompts = random_prompts(4, [9, 6, 7, 5], 512, seed=304)
    cpu, llm = _generate(model, prompts, 8, device="cpu", max_num_batched_tokens=4, max_num_seqs=4)
    llm.shutdown()
    gpu, llm = _generate(model, prompts, 8, device="cuda", max_num_batched_tokens=4, max_num_seqs=4)
    assert_all_free(llm.engine)
    llm.shutdown()
    assert gpu == cpu
