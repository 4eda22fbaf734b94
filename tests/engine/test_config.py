"""EngineConfig: machine-independent checks at construction, machine-dependent ones in resolved()."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

from engine.config import EngineConfig


def test_construction_leaves_machine_settings_open(models: dict[str, pathlib.Path]) -> None:
    """A serving YAML is validated on the router's machine, which may have no GPU at all."""
    cfg = EngineConfig(model=str(models["llama"]))
    assert cfg.device == "auto" and cfg.async_scheduling is None and not cfg.is_resolved
    assert EngineConfig(model=str(models["llama"]), device="cuda", tensor_parallel_size=2).device == "cuda"


def test_resolved_is_concrete_and_idempotent(models: dict[str, pathlib.Path]) -> None:
    cfg = EngineConfig(model=str(models["llama"]))
    r = cfg.resolved()
    cuda = torch.cuda.is_available()
    assert r.device == ("cuda" if cuda else "cpu") and r.async_scheduling is cuda and r.is_resolved
    assert r.resolved() == r and cfg.device == "auto"  # a copy: the original is unchanged
    assert dataclasses.replace(cfg, device="cpu").resolved().async_scheduling is False  # auto: off on CPU
    assert dataclasses.replace(r, device="cpu").resolved().async_scheduling is r.async_scheduling  # kept


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the refusal without 2 GPUs")
def test_resolved_checks_the_gpus_of_this_machine(models: dict[str, pathlib.Path]) -> None:
    cfg = EngineConfig(model=str(models["llama"]), device="cuda", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 needs that many GPUs"):
        cfg.resolved()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 12}, "block_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_model_len": 4096}, "max_model_len"),
        ({"num_kv_blocks": 2}, "num_kv_blocks"),
        ({"load_format": "pickle"}, "load_format"),
    ],
)
def test_bad_engine_config_is_named(models: dict[str, pathlib.Path], kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(model=str(models["llama"]), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "message"), [
    (3, "tensor_parallel_size: 3 is not one of 1, 2, 4, 8"),
    (16, "tensor_parallel_size: 16 is not one of 1, 2, 4, 8"),
    (8, r"tensor_parallel_size: 8 does not divide the model's num_attention_heads \(4\)"),
])
def test_tp_size_the_heads_do_not_allow_is_refused(models: dict[str, pathlib.Path], size: int,
                                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(model=str(models["llama"]), tensor_parallel_size=size)


@pytest.mark.parametrize(("model", "size"), [("llama_mqa", 2), ("llama_mqa", 4), ("llama", 4)])
def test_tp_above_the_kv_heads_is_accepted(models: dict[str, pathlib.Path], model: str, size: int) -> None:
    """1 KV head at TP 2 or 4, 2 KV heads at TP 4: the KV heads are replicated (engine/kv_heads.py)."""
    assert EngineConfig(model=str(models[model]), tensor_parallel_size=size).tensor_parallel_size == size


def test_tp_neither_dividing_nor_a_multiple_of_the_kv_heads_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 12, "num_key_value_heads": 6, "head_dim": 16}))
    with pytest.raises(ValueError, match=r"tensor_parallel_size: 4 neither divides nor is a multiple of the "
                                         r"model's num_key_value_heads \(6\)"):
        EngineConfig(model=str(tmp_path), tensor_parallel_size=4)
    assert EngineConfig(model=str(tmp_path), tensor_parallel_size=2).tensor_parallel_size == 2
