"""ModelInfo: the router's model facts equal the engine's, and the one prompt validation both run."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from engine.config import EngineConfig
from engine.model_info import ModelInfo
from tests.model_factory import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("model_info") / "llama", "llama", seed=0)


def _engine_config(model: pathlib.Path, **kwargs: object) -> EngineConfig:
    return EngineConfig(str(model), device="cpu", load_format="dummy", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("settings", [
    {},
    {"dtype": "bfloat16", "block_size": 32, "max_model_len": 100, "cache_salt": "tenant-a"},
])
def test_load_equals_the_engines_facts(model: pathlib.Path, settings: dict[str, object]) -> None:
    loaded = ModelInfo.load(str(model), **settings)  # type: ignore[arg-type]
    cfg = _engine_config(model, **settings)
    assert loaded == ModelInfo.from_config(cfg)
    # and they are the engine's own values, not merely equal to each other
    assert loaded.hash_salt == cfg.hash_salt and loaded.max_model_len == cfg.max_model_len
    assert loaded.dtype == cfg.dtype_name and loaded.eos_token_ids == cfg.model_config.eos_token_ids


def test_facts_read_from_the_model_directory(model: pathlib.Path) -> None:
    raw = json.loads((model / "config.json").read_text())
    info = ModelInfo.load(str(model))
    assert info.vocab_size == raw["vocab_size"] and info.max_model_len == raw["max_position_embeddings"]
    assert info.dtype == "float32" and info.block_size == 16 and info.eos_token_ids
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.vocab_size = 1  # type: ignore[misc]


def test_salt_separates_what_changes_the_kv(model: pathlib.Path) -> None:
    base = ModelInfo.load(str(model)).hash_salt
    assert ModelInfo.load(str(model), dtype="bfloat16").hash_salt != base
    assert ModelInfo.load(str(model), cache_salt="x").hash_salt != base
    assert ModelInfo.load(str(model), block_size=32).hash_salt == base  # block size is in the hash, not the salt


def test_max_model_len_limits_are_the_engines(tmp_path: pathlib.Path, model: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="max_model_len: 5000 exceeds the model's limit 1024"):
        ModelInfo.load(str(model), max_model_len=5000)
    with pytest.raises(ValueError, match="must be at least 2"):
        ModelInfo.load(str(model), max_model_len=1)
    windowed = make_tiny_model(tmp_path / "mistral", "mistral", seed=2)
    raw = json.loads((windowed / "config.json").read_text())
    raw["sliding_window"] = 300
    (windowed / "config.json").write_text(json.dumps(raw))
    assert ModelInfo.load(str(windowed)).max_model_len == 300 == _engine_config(windowed).max_model_len


@pytest.mark.parametrize(("prompt", "message"), [
    ([], "prompt is empty: at least one token is required"),
    ([5, 512, 7], r"prompt token id 512 is outside the vocabulary \[0, 512\)"),
    ([5, -1], r"prompt token id -1 is outside the vocabulary \[0, 512\)"),
    (list(range(3, 103)), "prompt has 100 tokens but max_model_len is 100: at most 99 prompt tokens fit"),
])
def test_validate_prompt_refuses(model: pathlib.Path, prompt: list[int], message: str) -> None:
    info = ModelInfo.load(str(model), max_model_len=100)
    assert info.vocab_size == 512
    with pytest.raises(ValueError, match=message):
        info.validate_prompt(prompt)


def test_validate_prompt_accepts_the_edges(model: pathlib.Path) -> None:
    info = ModelInfo.load(str(model), max_model_len=100)
    info.validate_prompt([0, 511])
    info.validate_prompt(list(range(99)))
