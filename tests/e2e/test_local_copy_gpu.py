"""Same-host KV reads by local copy inside the serving cluster on two GPUs: Ray gives the prefill and the decode
instance one GPU each (each process sees only its own), the decode instance maps the prefill instance's KV by its
CUDA IPC handle and copies it itself (kv_transfer.local_copy, on by default on GPU). Greedy tokens equal
transformers' (float32), and the router's metrics show every pulled byte went by local copy, with no fallback.
Needs 2 GPUs; skipped elsewhere."""

from __future__ import annotations

import pathlib
import time

import pytest
import torch

from api.v1 import pdserve_pb2 as pb
from tests.e2e.serve_process import serve
from tests.e2e.test_metrics import scrape, value
from tests.model_factory import hf_greedy, random_prompts

pytestmark = [pytest.mark.slow, pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_local_copy_between_two_gpus_gives_exact_tokens(tmp_path: pathlib.Path,
                                                        models: dict[str, pathlib.Path]) -> None:
    model = models["llama"]
    edits = {"engine": {"device": "cuda", "kv_cache_memory_bytes": 1 << 28}}  # kv_transfer.local_copy: the default
    prompts = random_prompts(4, [40, 90, 200, 300], 512, seed=1818)  # all over max_local_prefill_tokens (32)
    with serve(tmp_path, model, edits) as server:
        outs = [[t for r in server.generate(p, max_tokens=16) for t in r.token_ids] for p in prompts]
        decode = [i.instance_id for i in server.stub.GetLoads(pb.GetLoadsRequest()).instances if i.role == "decode"]
        deadline = time.monotonic() + 15  # stats records: a heartbeat, then the router's read
        while True:
            m = scrape(server.metrics_url)
            moved = value(m, "pdserve:kv_transfer_bytes", "pdserve:kv_transfer_bytes_total", instance=decode[0])
            if (moved or 0) > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        local = value(m, "pdserve:kv_local_copy_bytes", "pdserve:kv_local_copy_bytes_total", instance=decode[0])
        fallbacks = value(m, "pdserve:kv_local_copy_fallbacks", "pdserve:kv_local_copy_fallbacks_total",
                          instance=decode[0])
    assert outs == [hf_greedy(model, p, 16) for p in prompts]
    assert len(decode) == 1 and (moved or 0) > 0
    assert local == moved and fallbacks == 0
