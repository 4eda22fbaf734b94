"""Backend choice: "auto" picks the reference on CPU; explicit names that cannot run here fail with the reason."""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention import select_backend
from engine.attention.flash_attn_backend import FlashAttnPagedAttention, flash_attn_available
from engine.attention.torch_ref import TorchPagedAttention


def test_auto_on_cpu_is_the_reference() -> None:
    assert select_backend("auto", "cpu", 16, 64) is TorchPagedAttention
    assert select_backend("torch", "cpu", 16, 64) is TorchPagedAttention


def test_unknown_name_is_refused() -> None:
    with pytest.raises(ValueError, match="attention_backend: 'paged' is not one of"):
        select_backend("paged", "cpu", 16, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_on_cpu_names_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton cannot run here"):
        select_backend("triton", "cpu", 16, 64)


def test_flash_attn_refuses_what_it_cannot_serve() -> None:
    why = FlashAttnPagedAttention.supports("cuda", torch.bfloat16, 16, 128)
    assert why is not None
    assert ("not installed" in why) if not flash_attn_available() else ("block_size % 256" in why)
    assert "CUDA device" in (FlashAttnPagedAttention.supports("cpu", torch.bfloat16, 256, 128) or "")
    assert "float16 or bfloat16" in (FlashAttnPagedAttention.supports("cuda", torch.float32, 256, 128) or "")
    with pytest.raises(ValueError, match="flash-attn cannot run here"):
        select_backend("flash-attn", "cuda", 16, 128)


def test_enforce_eager_and_backend_reach_the_runner(models: dict[str, pathlib.Path]) -> None:
    with LLM(model=str(models["llama"]), dtype="float32", device="cpu", attention_backend="torch",
             enforce_eager=True, kv_cache_memory_bytes=16 << 20) as llm:
        runner = llm.engine.executor.runner
        assert runner.attn.name == "torch" and runner.graphs is None
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        assert len(out[0].token_ids) == 2
