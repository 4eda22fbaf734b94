"""`LLM`, the offline entry over LLMEngine: greedy tokens equal transformers `generate` (float32, CPU) for every
architecture; half precision; generate() validates every prompt before queueing any; on a GPU, the whole engine
(Triton attention, decode CUDA graphs) against the CPU engine. Scheduling conditions driven through LLMEngine
itself are in test_llm_engine.py."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from tests.conftest import assert_all_free
from tests.conftest import generate_greedy as _generate
from tests.model_factory import hf_greedy, random_prompts

NEW_TOKENS = 32
# 1 .. ~200, including lengths on both sides of block boundaries (block_size 16).
REFERENCE_LENGTHS = [1, 2, 15, 16, 17, 31, 33, 64, 100, 127, 163, 200]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
GREEDY_12 = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LENGTHS = [1, 2, 15, 16, 17, 33, 64, 100, 127, 163, 200]  # the GPU tests'


def reference(model: pathlib.Path, prompt: list[int]) -> list[int]:
    return hf_greedy(model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "llama_tied_rope3"])
def test_greedy_matches_transformers(models: dict[str, pathlib.Path], arch: str) -> None:
    model = models[arch]
    prompts = random_prompts(len(REFERENCE_LENGTHS), REFERENCE_LENGTHS, 512, seed=10)
    llm = LLM(model=str(model), dtype="float32", block_size=16, tensor_parallel_size=1, enable_prefix_caching=True)
    try:
        outs = llm.generate(prompts, GREEDY)
        for prompt, out in zip(prompts, outs, strict=True):
            assert out.finish_reason == "length"
            assert out.token_ids == reference(model, prompt), f"prompt length {len(prompt)}"
        assert_all_free(llm.engine)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_mostly_agrees(models: dict[str, pathlib.Path], dtype: str) -> None:
    model = models["llama"]
    prompts = random_prompts(3, [10, 50, 120], 512, seed=18)
    with LLM(model=str(model), dtype=dtype) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        assert_all_free(llm.engine)
    # Rounding may flip a near-tie late in a sequence, but the first greedy token must agree.
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids[0] == reference(model, prompt)[0]


def test_generate_validates_all_prompts_before_queueing_any(models: dict[str, pathlib.Path]) -> None:
    with LLM(model=str(models["llama"]), dtype="float32") as llm:
        with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
            llm.generate([[5, 6, 7], []], GREEDY_12)
        assert not llm.engine.has_unfinished_requests()
        assert_all_free(llm.engine)
        assert llm.generate([[5, 6, 7]], GREEDY_12)[0].finish_reason == "length"


@pytest.mark.gpu
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


@pytest.mark.gpu
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
