"""Who may use a router and how much: the one object both fronts and `RouterService.generate` ask.

    front:     authenticate(authorization header / metadata) -> ApiKey | None (open)   UNAUTHENTICATED / 401
    generate:  admit(key, prompt tokens) once the prompt is tokenized                  RESOURCE_EXHAUSTED / 429
               charge(key, generated tokens) when the request ends (a task: never holds the stream)

Open (no `auth.api_keys`): every call is let through and no limit applies; said once at start. Its metrics:
`pdserve:requests_rejected{reason, key}` (reason: unauthenticated | rate_limited; key: the key's name, "-" for
none) and `pdserve:ratelimit_store_fallbacks` (decisions made by this router's own buckets, Redis unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import math

import grpc
from prometheus_client import CollectorRegistry, Counter

from metastore.api_keys import ApiKey
from router.auth import KeyRing, bearer_secret
from router.generation import RequestError
from router.rate_limit import RateLimiter

log = logging.getLogger(__name__)

NO_KEY = "-"


class AccessControl:
    def __init__(self, keys: KeyRing | None = None, limiter: RateLimiter | None = None) -> None:
        """`keys` None: open. `limiter` None: no limits (a key's limits need one)."""
        self.keys, self.limiter = keys, limiter
        self._charges: set[asyncio.Task[None]] = set()
        self.rejected: Counter | None = None
        self.store_fallbacks: Counter | None = None

    @property
    def open(self) -> bool:
        return self.keys is None

    def register(self, registry: CollectorRegistry) -> None:
        """Its metrics, in the router's registry."""
        self.rejected = Counter("pdserve:requests_rejected", "Requests refused before they ran, by reason "
                                "(unauthenticated, rate_limited; max_inflight, slo: router/service.py) and API key "
                                "name (- for none)", ["reason", "key"], registry=registry)
        for reason in ("unauthenticated", "max_inflight", "slo"):
            self.rejected.labels(reason, NO_KEY)  # present at 0 from the start
        self.store_fallbacks = Counter("pdserve:ratelimit_store_fallbacks", "Rate-limit decisions made by this "
                                       "router's own buckets because Redis could not be reached", registry=registry)
        if self.limiter is not None:
            self.limiter.on_fallback = self.store_fallbacks.inc

    def describe(self) -> str:
        """The line a router logs once at start: whether its ports are open."""
        if self.keys is None:
            return "auth: open (no auth section) — anyone reaching the ports can use them"
        return (f"auth: {len(self.keys)} keys ({', '.join(self.keys.names()) or 'none yet'}); added and revoked at "
                f"runtime through Redis {self.keys.store.key}")

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key from its `Bearer KEY` value; None when open. Raises RequestError(UNAUTHENTICATED).
        NOTE: memory only (a hash and a dict lookup): on the event loop."""
        if self.keys is None:
            return None
        secret = bearer_secret(authorization)
        key = self.keys.lookup(secret) if secret is not None else None
        if key is None:
            self._reject("unauthenticated", NO_KEY)
            why = "missing API key: send the header `authorization: Bearer KEY`" if secret is None else \
                "invalid or revoked API key"
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, why)
        return key

    def authenticate_grpc(self, context: grpc.aio.ServicerContext) -> ApiKey | None:
        """`authenticate` with a gRPC call's `authorization` metadata (not read when open)."""
        if self.keys is None:
            return None
        value = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        return self.authenticate(value if isinstance(value, str) else None)

    async def admit(self, key: ApiKey | None, prompt_tokens: int) -> None:
        """Take one request and its prompt tokens from the key's buckets, or raise RequestError
        (RESOURCE_EXHAUSTED, with retry_after_s)."""
        if key is None or self.limiter is None or key.limits.unlimited:
            return
        refusal = await self.limiter.admit(key, prompt_tokens)
        if refusal is not None:
            self._reject("rate_limited", key.name)
            limit = getattr(key.limits, refusal.limit)
            secs = max(1, math.ceil(refusal.retry_after_s))
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"rate limit of API key {key.name!r}: "
                               f"{refusal.limit} {limit} reached; retry after {secs} s",
                               retry_after_s=refusal.retry_after_s)

    def charge(self, key: ApiKey | None, generated_tokens: int) -> None:
        """Take the generated tokens from the key's token bucket, on a task of its own."""
        if key is None or self.limiter is None or not key.limits.tokens_per_minute or generated_tokens <= 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # NOTE: a stream closed outside the loop (collected): nothing can await the charge
            log.error("%d generated tokens of key %r not charged: no event loop", generated_tokens, key.name)
            return
        task = loop.create_task(self.limiter.charge(key, generated_tokens))
        self._charges.add(task)  # NOTE: a reference, or the task may be collected before it runs
        task.add_done_callback(self._charged)

    def _charged(self, task: asyncio.Task[None]) -> None:
        self._charges.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("charging generated tokens failed: %r", task.exception())

    def _reject(self, reason: str, name: str) -> None:
        if self.rejected is not None:
            self.rejected.labels(reason, name).inc()

    def close(self) -> None:
        if self.keys is not None:
            self.keys.close()
