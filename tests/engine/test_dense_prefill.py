"""A prefill step of one fresh bf16 prompt attends with SDPA over its contiguous K/V
(engine/attention/triton_backend.py, PDSERVE_DENSE_PREFILL); the engine around it must not notice (GPU only)."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from tests.model_factory import random_prompts


@pytest.mark.gpu
def test_dense_prefill_gives_the_paged_kernels_tokens(models: dict[str, pathlib.Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """12 prompts of 256-600 tokens, each generated alone (so that every prefill step is one fresh prompt), bf16
    with graphs, dense prefill on and off. Different attention kernels round differently in bf16, so a
    near-tie may flip a token: at least 10 of the 12 first tokens must agree (a broken path agrees on ~none),
    and the whole continuation wherever the first token agrees on 8 or more prompts."""
    from engine.attention.triton_backend import DENSE_PREFILL_MIN_TOKENS

    model = models["llama"]
    lens = [DENSE_PREFILL_MIN_TOKENS + 31 * i for i in range(12)]
    prompts = random_prompts(12, lens, 512, seed=411)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[list[int]]] = {}
    for env in ("1", "0"):
        monkeypatch.setenv("PDSERVE_DENSE_PREFILL", env)
        with LLM(model=str(model), dtype="bfloat16", device="cuda", max_num_seqs=4) as llm:
            runs[env] = [llm.generate([p], params)[0].token_ids for p in prompts]
            dense_steps = llm.engine.executor.runner.attn.dense_prefill_steps
        assert (dense_steps == 12) if env == "1" else (dense_steps == 0), (env, dense_steps)
    first = sum(a[0] == b[0] for a, b in zip(runs["1"], runs["0"], strict=True))
    assert first >= 10, f"first tokens agree on {first} of 12 prompts"
    same = sum(a == b for a, b in zip(runs["1"], runs["0"], strict=True))
    assert same >= 8, f"continuations agree on {same} of 12 prompts"


@pytest.mark.gpu
def test_dense_prefill_padded_to_buckets_gives_the_same_tokens(models: dict[str, pathlib.Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """PDSERVE_DENSE_PREFILL_BUCKET: the same 12 lone prompts, their dense steps padded to 64-token buckets (whose
    plans the warm-up built) against exact lengths. Only the kernel's rounding may differ, so as above: at least 10
    of 12 first tokens and 8 of 12 continuations agree (padding in the wrong place agrees on ~none)."""
    from engine.attention.dense_prefill import DENSE_PREFILL_MIN_TOKENS

    model = models["llama"]
    prompts = random_prompts(12, [DENSE_PREFILL_MIN_TOKENS + 29 * i for i in range(12)], 512, seed=412)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    runs: dict[str, list[list[int]]] = {}
    for bucket in ("64", "0"):
        monkeypatch.setenv("PDSERVE_DENSE_PREFILL_BUCKET", bucket)
        with LLM(model=str(model), dtype="bfloat16", device="cuda", max_num_seqs=4) as llm:
            warmed = llm.engine.warmup
            runs[bucket] = [llm.generate([p], params)[0].token_ids for p in prompts]
            # the warm-up's own dense steps (one per padded length) were not counted
            assert llm.engine.executor.runner.attn.dense_prefill_steps == 12
        assert warmed is not None and all(warmed.covers().values())
        assert bool(warmed.dense_lengths) == (bucket == "64")
    first = sum(a[0] == b[0] for a, b in zip(runs["64"], runs["0"], strict=True))
    assert first >= 10, f"first tokens agree on {first} of 12 prompts"
    assert sum(a == b for a, b in zip(runs["64"], runs["0"], strict=True)) >= 8
