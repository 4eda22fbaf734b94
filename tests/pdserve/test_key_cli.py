"""`pdserve key`: a new key's secret matches its YAML entry; add, revoke, forget and list change a real Redis's
{ns}:apikeys (needing only the metastore section, not the model); no cluster is one line and exit 2."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import pytest
import redis
import yaml

from metastore import RedisServer
from metastore.api_keys import ApiKey, ApiKeyStore, KeyLimits, Priority, hash_key
from pdserve.cli import main


@pytest.fixture
def config(tmp_path: pathlib.Path) -> Iterator[tuple[pathlib.Path, ApiKeyStore]]:
    with RedisServer() as server:
        path = tmp_path / "serving.yaml"
        path.write_text(yaml.safe_dump({"engine": {"model": "/not/here"},
                                        "metastore": {"redis_url": server.url, "namespace": "k"}}))
        yield path, ApiKeyStore(redis.Redis.from_url(server.url), "k")


def test_new_prints_the_secret_and_its_yaml_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["key", "new", "--name", "team-a", "--priority", "batch", "--tokens-per-minute", "1000"]) == 0
    out = capsys.readouterr().out
    secret = re.search(r"(pdsk-\S+)", out)[1]  # type: ignore[index]
    entry = yaml.safe_load(out.split("auth.api_keys entry:\n", 1)[1])[0]
    priority = Priority.parse(entry["priority"])
    assert ApiKey(entry["name"], entry["key_sha256"], priority, KeyLimits(**entry["limits"])) == \
        ApiKey("team-a", hash_key(secret), Priority.BATCH, KeyLimits(tokens_per_minute=1000))


def test_add_revoke_forget_list(config: tuple[pathlib.Path, ApiKeyStore], capsys: pytest.CaptureFixture[str]) -> None:
    path, store = config
    assert main(["key", "add", "--config", str(path), "--name", "a", "--requests-per-minute", "5"]) == 0
    secret = re.search(r"(pdsk-\S+)", capsys.readouterr().out)[1]  # type: ignore[index]
    assert store.read().added == {"a": ApiKey("a", hash_key(secret), limits=KeyLimits(requests_per_minute=5))}
    assert main(["key", "add", "--config", str(path), "--name", "b", "--key-sha256", hash_key("s")]) == 0
    assert "pdsk-" not in capsys.readouterr().out  # an existing secret's hash: nothing secret to show
    assert main(["key", "revoke", "--config", str(path), "--name", "a"]) == 0
    assert store.read().revoked == {"a"} and set(store.read().added) == {"b"}
    capsys.readouterr()
    assert main(["key", "list", "--config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"b\tadded\tinteractive\tunlimited\t{hash_key('s')}",
                                                    "a\trevoked"]
    assert main(["key", "forget", "--config", str(path), "--name", "a"]) == 0
    assert store.read().revoked == frozenset()
    assert main(["key", "add", "--config", str(path), "--name", "bad name"]) == 2
    assert "name: 'bad name' must be" in capsys.readouterr().err


def test_no_cluster_is_one_line_and_exit_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_RUNTIME_DIR", str(tmp_path / "run"))
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump({"metastore": {"namespace": "nobody"}}))
    assert main(["key", "list", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdserve key: no running cluster") and len(err.splitlines()) == 1
