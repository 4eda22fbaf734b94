"""Per-key token buckets shared by every router replica through Redis: requests per minute and tokens per minute
(prompt + generated), each refilled evenly over a minute up to its limit.

    {ns}:rl:{name}:req   HASH  l (level), t (Redis server time of l)       (expires once it would be full again)
    {ns}:rl:{name}:tok   HASH  l, t

One Lua script per decision, atomic in Redis, on Redis's clock (so routers with skewed clocks agree):
- admit: refused (RESOURCE_EXHAUSTED / 429, with the seconds until it would pass) when the request bucket holds
  less than 1 or the token bucket less than 1; else takes 1 request and the prompt's tokens.
- charge: takes the generated tokens when the request ends.
NOTE: the token bucket may go below zero (a request's size is known only at its end): a key that has used its
`tokens_per_minute` is refused until the debt has refilled, so it never gets more than its limit per minute
plus one request.

Redis calls go through redis.asyncio, on the event loop without blocking it. When Redis cannot be reached
(a call fails or takes over `timeout_s`), decisions are made by this router's own buckets, with the same rules:
every such decision is counted (`pdserve:ratelimit_store_fallbacks`) and logged at most once per 10 s. Every
`LOCAL_S` one request probes Redis again (the others meanwhile go on locally, so a hung Redis delays one request
per probe, by at most `timeout_s`); the first answer ends the fallback. NOTE: never fail open; the cost is that
each router then allows the full limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from metastore.api_keys import ApiKey
from router.wire import RateLimitedWarning

log = logging.getLogger(__name__)

LOCAL_S = 1.0  # after a Redis failure, decide locally this long before one request tries Redis again
# NOTE: generous: on a loaded host (measured: a 2-core machine at load average 20) a healthy Redis's answer took
# over 0.25 s now and then, which must not count as an outage
TIMEOUT_S = 1.0

# KEYS: request bucket, token bucket. ARGV: requests_per_minute, tokens_per_minute (0: no bucket), mode ("a"
# admit | "c" charge), tokens. Returns {1} admitted/charged, or {0, seconds to wait (a string), the limit}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, mode, n = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return cap end
  return math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / 60)
end
local function store(key, l, cap)
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((cap - l) * 60000 / cap) + 1000)
end
local rl = rpm > 0 and level(KEYS[1], rpm) or 0
local tl = tpm > 0 and level(KEYS[2], tpm) or 0
if mode == 'a' then
  local wr = (rpm > 0 and rl < 1) and (1 - rl) * 60 / rpm or 0
  local wt = (tpm > 0 and tl < 1) and (1 - tl) * 60 / tpm or 0
  if wr > 0 or wt > 0 then
    if wt >= wr then return {0, tostring(wt), 'tokens_per_minute'} end
    return {0, tostring(wr), 'requests_per_minute'}
  end
  if rpm > 0 then store(KEYS[1], rl - 1, rpm) end
end
if tpm > 0 then store(KEYS[2], tl - n, tpm) end
return {1}
"""


@dataclass(frozen=True)
class Refusal:
    """Over a limit: which one, and the seconds until the request would pass."""

    limit: str  # "requests_per_minute" | "tokens_per_minute"
    retry_after_s: float


class LocalBuckets:
    """The same buckets in this process's memory (the fallback while Redis cannot be reached)."""

    def __init__(self) -> None:
        self._levels: dict[tuple[str, str], tuple[float, float]] = {}  # (name, "req"|"tok") -> (level, when)

    def _level(self, name: str, kind: str, cap: int, now: float) -> float:
        level, at = self._levels.get((name, kind), (float(cap), now))
        return min(cap, level + (now - at) * cap / 60)

    def decide(self, key: ApiKey, admit: bool, tokens: int) -> Refusal | None:
        now, lim = time.monotonic(), key.limits
        rpm, tpm = lim.requests_per_minute, lim.tokens_per_minute
        rl = self._level(key.name, "req", rpm, now) if rpm else 0.0
        tl = self._level(key.name, "tok", tpm, now) if tpm else 0.0
        if admit:
            refusal = _refusal(rpm, rl, tpm, tl)
            if refusal is not None:
                return refusal
            if rpm:
                self._levels[(key.name, "req")] = (rl - 1, now)
        if tpm:
            self._levels[(key.name, "tok")] = (tl - tokens, now)
        return None


def _refusal(rpm: int, rl: float, tpm: int, tl: float) -> Refusal | None:
    """As the script decides: a bucket below 1 refuses, for the longer of the two waits."""
    wait_r = (1 - rl) * 60 / rpm if rpm and rl < 1 else 0.0
    wait_t = (1 - tl) * 60 / tpm if tpm and tl < 1 else 0.0
    if wait_r <= 0 and wait_t <= 0:
        return None
    return Refusal("tokens_per_minute", wait_t) if wait_t >= wait_r else Refusal("requests_per_minute", wait_r)


class RateLimiter:
    """`admit` before a request runs, `charge` when it ends. `on_fallback` is called once per decision made
    locally (the metric)."""

    def __init__(self, redis_url: str, namespace: str, on_fallback: Callable[[], None] | None = None,
                 timeout_s: float = TIMEOUT_S) -> None:
        # NOTE: no retries: a call that fails falls back at once rather than holding the request
        self.r = aredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                       retry=Retry(NoBackoff(), 0))
        self.ns = namespace
        self._script = self.r.register_script(_SCRIPT)
        self.local = LocalBuckets()
        self.fallbacks = 0
        self.on_fallback = on_fallback
        self._local_until = 0.0  # while in the future: decide locally (Redis failed, or another request probes it)
        self.timeout_s = timeout_s
        self._warn = RateLimitedWarning(log)

    async def admit(self, key: ApiKey, prompt_tokens: int) -> Refusal | None:
        """None: admitted, its request and prompt tokens taken; else why not and for how long."""
        if key.limits.unlimited:
            return None
        return await self._decide(key, True, prompt_tokens)

    async def charge(self, key: ApiKey, tokens: int) -> None:
        if key.limits.tokens_per_minute and tokens > 0:
            await self._decide(key, False, tokens)

    async def _decide(self, key: ApiKey, admit: bool, tokens: int) -> Refusal | None:
        now = time.monotonic()
        if now >= self._local_until:
            if self._local_until:  # in fallback: this request probes; the others stay local until it is answered
                self._local_until = now + self.timeout_s + LOCAL_S
            lim = key.limits
            keys = [f"{self.ns}:rl:{key.name}:req", f"{self.ns}:rl:{key.name}:tok"]
            try:
                answer = await self._script(keys=keys, args=[lim.requests_per_minute, lim.tokens_per_minute,
                                                             "a" if admit else "c", tokens])
            except (redis.RedisError, OSError) as e:
                self._local_until = time.monotonic() + LOCAL_S
                self._warn.warn(f"rate limits: metadata store unreachable ({e!r}); enforcing this router's own "
                                f"buckets (each router allows the full limit) until it answers")
            else:
                if self._local_until:
                    log.warning("rate limits: metadata store reachable again; deciding in Redis")
                    self._local_until = 0.0
                if answer[0]:
                    return None
                return Refusal(answer[2].decode(), float(answer[1]))
        self.fallbacks += 1
        if self.on_fallback is not None:
            self.on_fallback()
        return self.local.decide(key, admit, tokens)

    async def close(self) -> None:
        await self.r.aclose()

