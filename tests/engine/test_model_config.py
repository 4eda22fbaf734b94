"""ModelConfig from a checkpoint's config.json: unsupported fields named, the context limit (sliding window),
max_model_len and dtype resolution, and a hash salt that is stable and changes with what changes the KV."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from engine import EngineConfig


def _edited(src: pathlib.Path, dst: pathlib.Path, **changes: object) -> pathlib.Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_config_field_is_named(models: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                           changes: dict[str, object], field: str) -> None:
    bad = _edited(models["llama"], tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=field):
        EngineConfig(model=str(bad))
