"""API keys on a real redis-server: the YAML's keys overlaid by {ns}:apikeys (added, replaced, revoked at runtime),
seen by a router's key ring within its refresh; the last keys stay in force while Redis is gone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from metastore import RedisServer
from metastore.api_keys import ApiKey, ApiKeyStore, KeyLimits, Priority, hash_key, new_secret
from router.auth import KeyRing, bearer_secret


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def wait_for(predicate: object, timeout: float = 2.0) -> float:
    """Seconds until predicate() holds (AssertionError after `timeout`)."""
    t0 = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - t0 < timeout, "not within the timeout"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_bearer_secret() -> None:
    assert bearer_secret("Bearer abc") == "abc" and bearer_secret("bearer  abc ") == "abc"
    assert bearer_secret(None) is None and bearer_secret("") is None and bearer_secret("Basic abc") is None
    assert bearer_secret("Bearer ") is None


def test_entry_json_round_trip() -> None:
    k = ApiKey("a", hash_key("s"), Priority.BATCH, KeyLimits(10, 2))
    assert ApiKey.from_json(k.to_json()) == k
    assert new_secret() != new_secret() and new_secret().startswith("pdsk-")


def test_runtime_keys_overlay_the_yaml_keys(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    store = ApiKeyStore(client, "ns")
    yaml_secret, new = new_secret(), new_secret()
    ring = KeyRing([ApiKey("yaml", hash_key(yaml_secret))], store, refresh_s=0.1).start()
    try:
        assert ring.lookup(yaml_secret) == ApiKey("yaml", hash_key(yaml_secret))
        assert ring.lookup(new) is None
        store.add(ApiKey("new", hash_key(new), Priority.BATCH))
        assert wait_for(lambda: ring.lookup(new) is not None) < 1.0
        assert ring.lookup(new).priority is Priority.BATCH  # type: ignore[union-attr]
        store.revoke("yaml")  # a tombstone revokes the YAML's key too
        assert wait_for(lambda: ring.lookup(yaml_secret) is None) < 1.0
        store.forget("yaml")  # the YAML's entry applies again
        assert wait_for(lambda: ring.lookup(yaml_secret) is not None) < 1.0
        client.hset("ns:apikeys", "broken", b"{not json")
        assert wait_for(lambda: ring.counters["malformed_entries"] > 0) < 1.0
        assert sorted(ring.names()) == ["new", "yaml"]
        # Redis gone: the last keys stay in force, each failed read counted
        server.stop()
        assert wait_for(lambda: ring.counters["store_fallbacks"] >= 2, 5.0) < 5.0
        assert ring.lookup(new) is not None and ring.lookup(yaml_secret) is not None
    finally:
        ring.close()
