"""A TP 2 instance as a Ray TP group on two GPUs (NCCL between two rank processes that each see one GPU): the
decode pool of `pdserve serve` at tensor_parallel_size 2 on CUDA gives transformers' greedy tokens (float32).
Needs 2 GPUs; skipped elsewhere."""

from __future__ import annotations

import pathlib

import pytest
import torch

from tests.e2e.serve_process import serve
from tests.model_factory import hf_greedy, random_prompts

pytestmark = [pytest.mark.slow, pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_tp2_group_on_two_gpus_gives_exact_tokens(tmp_path: pathlib.Path, models: dict[str, pathlib.Path]) -> None:
    model = models["llama"]
    edits = {"engine": {"device": "cuda", "kv_cache_memory_bytes": 1 << 28},
             "pools": {"prefill": {"replicas": 0}, "decode": {"replicas": 1, "tensor_parallel_size": 2}}}
    prompts = random_prompts(4, [5, 40, 90, 200], 512, seed=1717)
    with serve(tmp_path, model, edits) as server:
        outs = [[t for r in server.generate(p, max_tokens=16) for t in r.token_ids] for p in prompts]
    assert outs == [hf_greedy(model, p, 16) for p in prompts]
