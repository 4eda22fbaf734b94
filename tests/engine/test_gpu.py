"""The GPU engine (Triton attention, decode CUDA graphs, NCCL tensor parallelism) against the CPU engine and
transformers, in float32 where greedy tokens must agree exactly."""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graph import batch_buckets
from tests.conftest import assert_all_free
from tests.model_factory import hf_greedy, random_prompts

pytestmark = pytest.mark.gpu

LENGTHS = [1, 2, 15, 16, 17, 33, 64, 100, 127, 163, 200]


def _generate(model: pathlib.Path, prompts: list[list[int]], n: int, **kwargs: object) -> tuple[list, LLM]:
    llm = LLM(model=str(model), dtype="float32", **kwargs)  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)], llm


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_tied_rope3"])
def test_tiny_float32_gpu_equals_cpu(models: dict[str, pathlib.Path], name: str) -> None:
    """Batched (chunked prefill mixed with decodes, then graph-replayed decodes) and one at a time."""
    model = models[name]
    prompts = random_prompts(len(LENGTHS), LENGTHS, 512, seed=300)
    cpu, llm = _generate(model, prompts, 32, device="cpu")
    llm.shutdown()
    gpu, llm = _generate(model, prompts, 32, device="cuda", max_num_batched_tokens=256)
    runner = llm.engine.executor.runner
    assert runner.attn.name in ("triton", "flash-attn")
    if runner.attn.name == "triton":
        assert runner.graphs is not None and runner.graphs.replays > 0
    assert_all_free(llm.engine)
    llm.shutdown()
    assert gpu == cpu
    single = []
    with LLM(model=str(model), dtype="float32", device="cuda", max_num_seqs=1) as llm:
        for p in prompts[:4]:
            single += [o.token_ids for o in llm.generate([p], SamplingParams(max_tokens=32, temperature=0.0,
                                                                               ignore_eos=True))]
    assert single == cpu[:4]
    assert cpu[:3] == [hf_greedy(model, p, 32) for p in prompts[:3]]


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


def test_bf16_decode_tracks_the_float32_run(models: dict[str, pathlib.Path]) -> None:
    """bf16 with graphs: the first greedy tokens agree with float32 (rounding may split them later)."""
    model = models["llama"]
    prompts = random_prompts(6, [3, 30, 60, 90, 120, 150], 512, seed=302)
    f32, llm = _generate(model, prompts, 4, device="cuda")
    llm.shutdown()
    with LLM(model=str(model), dtype="bfloat16", device="cuda") as llm:
        bf16 = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0,
                                                                            ignore_eos=True))]
    assert sum(a[0] == b[0] for a, b in zip(f32, bf16, strict=True)) >= 5


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


def test_programmatic_dependent_launch_changes_no_token(models: dict[str, pathlib.Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 with graphs, the Triton kernels launched with PDL (engine/pdl.py) against launched without: the
    same kernels doing the same arithmetic, so greedy tokens must agree exactly. A kernel that read its input
    before `gdc_wait` would race its predecessor on these tiny, short kernels."""
    from engine import pdl

    if not pdl.enabled():
        pytest.skip("PDL is off on this GPU / Triton (see the log line of engine/pdl.py)")
    model = models["llama"]
    prompts = random_prompts(12, [3 + 17 * i for i in range(12)], 512, seed=305)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = {}
    for on in (True, False):
        monkeypatch.setitem(pdl._state, "on", on)
        with LLM(model=str(model), dtype="bfloat16", device="cuda", max_num_seqs=16) as llm:
            runs[on] = [o.token_ids for o in llm.generate(prompts, params)]
            assert llm.engine.executor.runner.graphs.replays > 0
    assert runs[True] == runs[False]
