"""The access object both fronts and `generate` ask, on a real redis-server: open lets everything through without
reading the call; with keys, a missing or wrong key is UNAUTHENTICATED and counted, a valid one is the caller's
typed entry (its priority class too); a key over its limit is RESOURCE_EXHAUSTED with the seconds to wait."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
import redis
from prometheus_client import CollectorRegistry

from metastore import RedisServer
from metastore.api_keys import ApiKey, ApiKeyStore, KeyLimits, Priority, hash_key, new_secret
from router.access import AccessControl
from router.auth import KeyRing
from router.generation import RequestError
from router.rate_limit import RateLimiter


@pytest.fixture
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


class NoMetadata:
    def invocation_metadata(self) -> object:
        raise AssertionError("an open router reads no metadata")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_open_lets_everything_through() -> None:
    access = AccessControl()
    access.register(CollectorRegistry())
    assert access.open and access.authenticate(None) is None
    assert access.authenticate_grpc(NoMetadata()) is None  # type: ignore[arg-type]
    asyncio.run(access.admit(None, 10**9))
    assert access.describe().startswith("auth: open")


def test_keys_priority_and_limits(redis_url: str) -> None:
    secret, batch_secret = new_secret(), new_secret()
    limited = ApiKey("limited", hash_key(secret), limits=KeyLimits(tokens_per_minute=60))
    batch = ApiKey("batch", hash_key(batch_secret), Priority.BATCH)
    ring = KeyRing([limited, batch], ApiKeyStore(redis.Redis.from_url(redis_url), "a")).start()
    access = AccessControl(ring, RateLimiter(redis_url, "a"))
    registry = CollectorRegistry()
    access.register(registry)
    try:
        assert access.authenticate(f"Bearer {secret}") == limited
        assert access.authenticate(f"Bearer {batch_secret}").priority is Priority.BATCH  # type: ignore[union-attr]
        for header, why in ((None, "missing API key"), ("Bearer nope", "invalid or revoked"),
                            (f"Basic {secret}", "missing API key")):
            with pytest.raises(RequestError, match=why) as e:
                access.authenticate(header)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert sample(registry, "pdserve:requests_rejected_total", reason="unauthenticated", key="-") == 3

        async def run() -> RequestError:
            await access.admit(limited, 50)
            access.charge(limited, 20)  # a task: 70 of 60 used
            await asyncio.sleep(0.1)
            await access.admit(batch, 10**6)  # no limits
            with pytest.raises(RequestError) as e:
                await access.admit(limited, 1)
            await access.limiter.close()  # type: ignore[union-attr]
            return e.value

        err = asyncio.run(run())
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens_per_minute 60" in err.message
        assert err.retry_after_s is not None and 10 < err.retry_after_s <= 11  # 11 tokens at 1 token/s
        assert err.retry_after_header == "11"
        assert sample(registry, "pdserve:requests_rejected_total", reason="rate_limited", key="limited") == 1
        assert sample(registry, "pdserve:ratelimit_store_fallbacks_total") == 0
    finally:
        access.close()
