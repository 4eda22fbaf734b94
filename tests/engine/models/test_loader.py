"""The checkpoint loader: a model directory without weights is refused with the way out (load_format='dummy');
dummy weights keep replicated K/V rows (TP > KV heads) identical across ranks."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch

from engine import LLM
from engine.executor import Worker


def test_missing_weights_is_a_clear_error(models: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(models["llama"] / "config.json", bare / "config.json")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        LLM(model=str(bare))


def _qkv_weight(worker: Worker) -> torch.Tensor:
    """Layer 0's merged q/k/v rows on one rank: [q_local + 2 · head_dim, hidden] (runs on every rank)."""
    return worker.runner.model.layers[0].self_attn.qkv_proj.weight.detach().clone()


def test_dummy_weights_replicate_kv_rows(models: dict[str, pathlib.Path]) -> None:
    """1 KV head at TP 2: both ranks hold the same K/V rows (one head, replicated) and different query rows."""
    with LLM(model=str(models["llama_mqa"]), load_format="dummy", dtype="float32", tensor_parallel_size=2,
             device="cpu", kv_cache_memory_bytes=8 << 20) as llm:
        # NOTE: every rank's weight through the executor's own fan-out.
        w0, w1 = llm.engine.executor._on_every_rank(_qkv_weight)  # each [2 · 16 + 2 · 16, 64]
    q = 2 * 16  # 2 query heads of 16 dims per rank
    assert torch.equal(w0[q:], w1[q:])
    assert not torch.equal(w0[:q], w1[:q])
