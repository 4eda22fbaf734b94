"""What API keys and per-key limits cost a request on the router's event loop, against a real redis-server.

    .venv/bin/python bench/access_overhead.py [--requests 5000]

Measures, in one run, on one asyncio loop:
  - authenticate: the Bearer value's SHA-256 and the in-memory lookup (router/access.py), per request;
  - admit: the per-key rate-limit decision, one Lua script round trip (router/rate_limit.py), per request,
    against the baseline of a PING round trip on the same redis.asyncio client (the floor of any Redis call);
  - admit under concurrency: `--concurrency` requests admitting at once (the loop keeps serving meanwhile).

The last line is exactly `access: authenticate X us, admit p50 Y us (PING p50 Z us, ratio R), admit p99 W us`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import redis
import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metastore import RedisServer  # noqa: E402
from metastore.api_keys import ApiKey, ApiKeyStore, KeyLimits, hash_key, new_secret  # noqa: E402
from router.access import AccessControl  # noqa: E402
from router.auth import KeyRing  # noqa: E402
from router.rate_limit import RateLimiter  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


async def measure(url: str, n: int, concurrency: int) -> None:
    secret = new_secret()
    # NOTE: limits far above what the run uses: every admission is a full decision, none refused
    key = ApiKey("bench", hash_key(secret), limits=KeyLimits(tokens_per_minute=10**12, requests_per_minute=10**9))
    others = [ApiKey(f"k{i}", hash_key(f"s{i}")) for i in range(1000)]  # a realistic key ring
    ring = KeyRing([key, *others], ApiKeyStore(redis.Redis.from_url(url), "bench"))
    access = AccessControl(ring, RateLimiter(url, "bench"))
    ping = aredis.Redis.from_url(url)
    header = f"Bearer {secret}"
    t0 = time.perf_counter()
    for _ in range(n):
        access.authenticate(header)
    auth_us = (time.perf_counter() - t0) / n * 1e6
    admits, pings = [], []
    for _ in range(n):  # interleaved, so drift falls on both
        t = time.perf_counter()
        await ping.ping()
        pings.append((time.perf_counter() - t) * 1e6)
        t = time.perf_counter()
        await access.admit(key, 100)
        admits.append((time.perf_counter() - t) * 1e6)
    t0 = time.perf_counter()
    for _ in range(n // concurrency):
        await asyncio.gather(*(access.admit(key, 100) for _ in range(concurrency)))
    per_s = (n // concurrency) * concurrency / (time.perf_counter() - t0)
    assert access.limiter is not None
    print(f"decisions made locally (Redis too slow or unreachable): {access.limiter.fallbacks}")
    p50, p50_ping = statistics.median(admits), statistics.median(pings)
    print(f"admissions at concurrency {concurrency}: {per_s:.0f}/s")
    print(f"access: authenticate {auth_us:.1f} us, admit p50 {p50:.0f} us (PING p50 {p50_ping:.0f} us, ratio "
          f"{p50 / p50_ping:.2f}), admit p99 {pct(admits, 0.99):.0f} us")
    await access.limiter.close()
    await ping.aclose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    with RedisServer() as server:
        asyncio.run(measure(server.url, args.requests, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
