"""The checkpoint loader: a model directory without weights is refused with the way out (load_format='dummy')."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from engine import LLM


def test_missing_weights_is_a_clear_error(models: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(models["llama"] / "config.json", bare / "config.json")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        LLM(model=str(bare))
