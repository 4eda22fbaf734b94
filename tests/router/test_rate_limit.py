"""Per-key token buckets on a real redis-server: two limiters (two router replicas) share one key's limits; the
generated tokens charged at the end refuse the next request; another key is unaffected; with Redis killed the
decisions go on in each router's own buckets, counted, never failing open."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from metastore import RedisServer
from metastore.api_keys import ApiKey, KeyLimits, hash_key
from router.rate_limit import LOCAL_S, LocalBuckets, RateLimiter


@pytest.fixture
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def key(name: str, tpm: int = 0, rpm: int = 0) -> ApiKey:
    return ApiKey(name, hash_key(name), limits=KeyLimits(tokens_per_minute=tpm, requests_per_minute=rpm))


def test_token_limit_holds_across_two_replicas_and_spares_other_keys(redis_url: str) -> None:
    async def run() -> None:
        a, b = RateLimiter(redis_url, "t1"), RateLimiter(redis_url, "t1")
        limited, other = key("limited", tpm=600), key("other", tpm=600)
        try:
            assert await a.admit(limited, 100) is None  # 100 of 600
            await a.charge(limited, 200)  # 300
            assert await b.admit(limited, 100) is None  # the other replica: 400
            await b.charge(limited, 200)  # 600 used: the bucket is empty (plus a sliver refilled meanwhile)
            for limiter in (a, b):
                refusal = await limiter.admit(limited, 1)
                assert refusal is not None and refusal.limit == "tokens_per_minute"
                assert 0 < refusal.retry_after_s <= 0.2  # 1 token at 10 tokens/s
            assert await a.admit(other, 100) is None and await b.admit(other, 100) is None
            assert a.fallbacks == b.fallbacks == 0
            await asyncio.sleep(0.25)  # refilled 2.5 tokens: admitted again
            assert await a.admit(limited, 1) is None
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def test_requests_per_minute(redis_url: str) -> None:
    async def run() -> None:
        a, b = RateLimiter(redis_url, "t2"), RateLimiter(redis_url, "t2")
        k = key("k", rpm=3)
        try:
            assert [await lim.admit(k, 10) for lim in (a, b, a)] == [None, None, None]
            refusal = await b.admit(k, 10)
            assert refusal is not None and refusal.limit == "requests_per_minute"
            assert 19 < refusal.retry_after_s <= 20  # one request per 20 s
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def test_redis_killed_falls_back_to_local_buckets_counted_and_comes_back() -> None:
    async def run(server: RedisServer) -> None:
        assert server.proc is not None
        fallbacks: list[int] = []
        a = RateLimiter(server.url, "t3", on_fallback=lambda: fallbacks.append(1))
        k = key("k", tpm=100)
        try:
            assert await a.admit(k, 10) is None and a.fallbacks == 0
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
            # the local buckets start full: 100 tokens, then refuse (never fail open)
            assert await a.admit(k, 60) is None
            await a.charge(k, 40)
            refusal = await a.admit(k, 1)
            assert refusal is not None and refusal.limit == "tokens_per_minute"
            assert a.fallbacks == 3 and len(fallbacks) == 3
            assert server.restart_if_dead()  # an empty Redis on the same port
            await asyncio.sleep(LOCAL_S + 0.1)
            assert await a.admit(k, 1) is None  # decided in Redis again: its bucket is new (full)
            assert a.fallbacks == 3
        finally:
            await a.close()

    with RedisServer() as server:
        asyncio.run(run(server))


def test_a_hung_redis_delays_one_probe_at_a_time() -> None:
    async def run(server: RedisServer) -> None:
        assert server.proc is not None
        a = RateLimiter(server.url, "t4", timeout_s=0.3)
        k = key("k", rpm=1000)
        try:
            assert await a.admit(k, 1) is None
            os.kill(server.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            assert await a.admit(k, 1) is None  # waited for Redis up to the timeout, then decided locally
            assert 0.25 < time.monotonic() - t0 < 1.0
            t0 = time.monotonic()
            results = await asyncio.gather(*(a.admit(k, 1) for _ in range(20)))  # local at once
            assert results == [None] * 20 and time.monotonic() - t0 < 0.1 and a.fallbacks == 21
            await asyncio.sleep(LOCAL_S)
            t0 = time.monotonic()
            results = await asyncio.gather(*(a.admit(k, 1) for _ in range(20)))  # one probes, the others local
            assert results == [None] * 20 and 0.25 < time.monotonic() - t0 < 1.0 and a.fallbacks == 41
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
            await a.close()

    with RedisServer() as server:
        asyncio.run(run(server))


def test_local_buckets_refill_evenly() -> None:
    buckets, k = LocalBuckets(), key("k", tpm=60, rpm=3)
    assert buckets.decide(k, True, 30) is None
    assert buckets.decide(k, True, 40) is None  # -10 tokens: in debt
    refusal = buckets.decide(k, True, 1)
    assert refusal is not None and refusal.limit == "tokens_per_minute" and 10 < refusal.retry_after_s <= 11
    assert buckets.decide(k, False, 5) is None  # a charge is never refused
    k2 = key("k2", tpm=6000, rpm=1)
    assert buckets.decide(k2, True, 1) is None
    refusal = buckets.decide(k2, True, 1)
    assert refusal is not None and refusal.limit == "requests_per_minute" and 59 < refusal.retry_after_s <= 60
