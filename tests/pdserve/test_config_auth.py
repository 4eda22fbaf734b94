"""The `auth:` section of the serving YAML: API keys (typed, validated, names unique), TLS files."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from metastore.api_keys import ApiKey, KeyLimits, Priority, hash_key
from pdserve.config import ConfigError, load_config
from pdserve.dummy_model import write_dummy_model

DEPLOY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "ray"
SHA_A, SHA_B = hash_key("a"), hash_key("b")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_dummy_model(tmp_path_factory.mktemp("model"), "llama3-8b"))


def load(tmp_path: pathlib.Path, model: str, auth: object) -> object:
    data = yaml.safe_load((DEPLOY / "serving-tiny-cpu.yaml").read_text())
    data["auth"] = auth
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, {"engine.model": model})


def test_no_auth_section_is_open(model: str) -> None:
    cfg = load_config(DEPLOY / "serving-tiny-cpu.yaml", {"engine.model": model})
    assert cfg.auth.api_keys is None and cfg.auth.tls is None


def test_keys_are_typed(tmp_path: pathlib.Path, model: str) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    cfg = load(tmp_path, model, {"api_keys": [
        {"name": "team-a", "key_sha256": SHA_A, "priority": "batch", "limits": {"tokens_per_minute": 1000}},
        {"name": "team-b", "key_sha256": SHA_B}], "tls": {"cert": str(cert), "key": str(key)}})
    assert cfg.auth.api_keys == [ApiKey("team-a", SHA_A, Priority.BATCH, KeyLimits(tokens_per_minute=1000)),
                                 ApiKey("team-b", SHA_B, Priority.INTERACTIVE, KeyLimits())]
    assert cfg.auth.tls is not None and cfg.auth.tls.cert == str(cert)
    assert load(tmp_path, model, {"api_keys": []}).auth.api_keys == []  # closed: runtime keys only


@pytest.mark.parametrize(("auth", "message"), [
    ({"api_keys": [{"name": "a", "key_sha256": "abc"}]}, r"^auth\.api_keys\[0\]\.key_sha256: 'abc' is not a SHA-256"),
    ({"api_keys": [{"name": "a", "key_sha256": SHA_A.upper()}]}, r"^auth\.api_keys\[0\]\.key_sha256: .* lowercase"),
    ({"api_keys": [{"name": "a b", "key_sha256": SHA_A}]}, r"^auth\.api_keys\[0\]\.name: 'a b' must be 1-64"),
    ({"api_keys": [{"name": "a", "key_sha256": SHA_A}, {"name": "a", "key_sha256": SHA_B}]},
     r"^auth\.api_keys: the name 'a' is used twice"),
    ({"api_keys": [{"name": "a", "key_sha256": SHA_A}, {"name": "b", "key_sha256": SHA_A}]},
     r"^auth\.api_keys: 'b' has the same key_sha256"),
    ({"api_keys": [{"name": "a", "key_sha256": SHA_A, "priority": "urgent"}]},
     r"^auth\.api_keys\[0\]\.priority: 'urgent' is not one of \['interactive', 'batch'\]"),
    ({"api_keys": [{"name": "a", "key_sha256": SHA_A, "limits": {"tokens_per_minute": -1}}]},
     r"^auth\.api_keys\[0\]\.limits\.tokens_per_minute: -1 must be an integer >= 0"),
    ({"api_keys": [{"name": "a", "key_sha256": SHA_A, "limitz": {}}]}, r"^auth\.api_keys\[0\]\.limitz: unknown key"),
    ({"api_keys": {"name": "a"}}, r"^auth\.api_keys: expected a list"),
    ({"tls": {"cert": "/nonexistent.pem", "key": "/nonexistent.key"}}, r"^auth\.tls\.cert: '/nonexistent.pem' is not"),
])
def test_errors_name_their_key(tmp_path: pathlib.Path, model: str, auth: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, model, auth)
