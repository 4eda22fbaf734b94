"""EngineConfig: machine-independent checks at construction, machine-dependent ones in resolved()."""

from __future__ import annotations

import dataclasses
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


@pytest.mark.parametrize("size", [3, 4, 16])
def test_tp_size_the_heads_do_not_allow_is_refused(models: dict[str, pathlib.Path], size: int) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model=str(models["llama"]), tensor_parallel_size=size)
