"""Serving YAML: the shipped examples load, and every error names its key."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from pdserve.config import ConfigError, load_config

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "ray"


# Every serving YAML we ship (cluster.yaml is Ray's cluster launcher file, not ours).
@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "cluster.yaml"))
def test_shipped_examples_are_valid(name: str) -> None:
    cfg = load_config(DEPLOY / name)
    assert cfg.pools.decode.replicas >= 1 and cfg.block_size == 16


def test_overrides_apply_dotted_keys() -> None:
    cfg = load_config(DEPLOY / "serving-tiny-cpu.yaml", {"model": "/m", "server.port": 1234})
    assert cfg.model == "/m" and cfg.server.port == 1234 and cfg.scheduler.max_num_seqs == 16


def merge(base: dict, edit: dict) -> None:
    for key, value in edit.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"pools": {"prefill": {"replica": 2}}}, r"pools\.prefill\.replica: unknown key"),
        ({"pools": {"decode": {"replicas": 0}}}, r"pools\.decode\.replicas: 0 must be >= 1"),
        ({"pools": {"decode": {"tensor_parallel_size": 3}}}, r"pools\.decode\.tensor_parallel_size"),
        ({"block_size": 24}, r"block_size: 24"),
        ({"scheduler": {"max_num_seqs": "many"}}, r"scheduler\.max_num_seqs: 'many' is not a int"),
        ({"placement": {"kv_weight": -1}}, r"placement: .*kv_weight"),
        ({"server": {"port": 70000}}, r"server\.port"),
        ({"metastore": "redis://x"}, r"metastore: expected a mapping"),
        ({"dtype": "int4"}, r"dtype: 'int4'"),
        ({"attention_backend": "cudnn"}, r"attention_backend: 'cudnn' is not one of auto, torch, triton"),
        ({"enforce_eager": "yes"}, r"enforce_eager: 'yes' is not a bool"),
    ],
)
def test_errors_name_their_key(tmp_path: pathlib.Path, edit: dict, message: str) -> None:
    data = yaml.safe_load((DEPLOY / "serving-tiny-cpu.yaml").read_text())
    merge(data, edit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_model_and_bad_yaml(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.yaml").write_text("block_size: 16\n")
    with pytest.raises(ConfigError, match="model: required key is missing"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
