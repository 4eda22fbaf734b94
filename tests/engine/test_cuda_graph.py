"""Which steps the decode CUDA graphs may replay, and the bucket sizes (host logic only: runs on CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from engine.cuda_graph import DecodeGraphs, batch_buckets
from engine.model_runner import StepInput


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
