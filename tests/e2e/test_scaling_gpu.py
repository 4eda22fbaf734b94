"""Runtime P/D changes under load on a GPU: test_scaling.py's scenario (1P+1D -> 2P+1D -> 2P+2D, decode-1 flipped
to prefill and back, 0P+2D, 1P+1D under a Poisson stream of greedy requests) with every instance on CUDA. All
instances share the one GPU (`pools.*.gpus_per_instance: 0.25`, up to four at once), so it runs on a one-GPU
machine: a role switch swaps the engine's KV connector with its CUDA graphs and KV cache in place, and remote
prefills are read by local copy (a CUDA IPC mapping of the peer's KV on the same device). Outputs equal
transformers' greedy tokens (float32). Needs a GPU; skipped elsewhere."""

from __future__ import annotations

import pathlib
import time

import pytest
import torch

from tests.e2e.serve_process import Server
from tests.e2e.test_metrics import scrape, value
from tests.e2e.test_scaling import scale_and_flip_roles_under_load
from tests.model_factory import random_prompts

pytestmark = [pytest.mark.slow, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def read_by_local_copy(server: Server) -> None:
    """decode-0 (there from start to end) read every byte it pulled by local copy, with no fallback to NIXL."""
    for prompt in random_prompts(2, [90, 200], 512, seed=1919):  # over max_local_prefill_tokens: remote
        assert server.generate(prompt, max_tokens=4)[-1].routing.disaggregated
    deadline = time.monotonic() + 15  # the counters come with the instance's stats records
    while True:
        m = scrape(server.metrics_url)
        moved = value(m, "pdserve:kv_transfer_bytes", "pdserve:kv_transfer_bytes_total", instance="decode-0") or 0
        local = value(m, "pdserve:kv_local_copy_bytes", "pdserve:kv_local_copy_bytes_total", instance="decode-0")
        if (moved > 0 and local == moved) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    fallbacks = value(m, "pdserve:kv_local_copy_fallbacks", "pdserve:kv_local_copy_fallbacks_total",
                      instance="decode-0")
    assert moved > 0 and local == moved and fallbacks == 0, (moved, local, fallbacks)


def test_scale_and_role_flips_under_load_on_one_gpu(tmp_path: pathlib.Path,
                                                    models: dict[str, pathlib.Path]) -> None:
    share = {"gpus_per_instance": 0.25}
    scale_and_flip_roles_under_load(tmp_path, models["llama"], {
        "engine": {"device": "cuda", "kv_cache_memory_bytes": 1 << 28},
        "pools": {"prefill": share, "decode": share}}, after=read_by_local_copy)
