"""Who may call a router: the API keys it accepts, kept in memory and current from Redis on one thread, so that
checking a request's key is a SHA-256 and a dict lookup on the event loop, with no I/O.

    thread "api-keys": every refresh_s, HGETALL {ns}:apikeys (metastore/api_keys.py) -> a new dict, swapped whole

The keys are the YAML's `auth.api_keys` overlaid with the hash: an entry there adds or replaces a key, a
tombstone revokes one. A key added or revoked at runtime is seen within refresh_s. While Redis cannot be reached
the last keys stay in force (a revoked key is refused again once the hash can be read); each failed read is
counted (`store_fallbacks`) and logged at most once per 10 s.

Both fronts send `authorization: Bearer KEY`: HTTP as the header (the openai SDK's `api_key`), gRPC as call
metadata.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import redis

from metastore.api_keys import ApiKey, ApiKeyStore, RuntimeKeys, hash_key
from router.wire import RateLimitedWarning

log = logging.getLogger(__name__)

REFRESH_S = 0.5


def bearer_secret(authorization: str | None) -> str | None:
    """The key of an `authorization: Bearer KEY` value; None when there is none (no header, another scheme)."""
    if not authorization:
        return None
    scheme, _, secret = authorization.strip().partition(" ")
    secret = secret.strip()
    return secret if scheme.lower() == "bearer" and secret else None


class KeyRing:
    def __init__(self, base: list[ApiKey], store: ApiKeyStore, refresh_s: float = REFRESH_S) -> None:
        self.base = {k.name: k for k in base}
        self.store, self.refresh_s = store, refresh_s
        self.counters: Counter[str] = Counter()  # refreshes, store_fallbacks, malformed_entries
        self._warn = RateLimitedWarning(log)
        self._by_hash = self._merge(RuntimeKeys({}, frozenset()))  # NOTE: replaced whole, never mutated
        self._runtime: RuntimeKeys | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> KeyRing:
        """Read the hash once, then follow it on a thread (a Redis that cannot be reached now is logged; the
        YAML's keys serve until it can)."""
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="api-keys", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def lookup(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, or None. NOTE: ~1 us; reads only memory."""
        return self._by_hash.get(hash_key(secret))

    def __len__(self) -> int:
        return len(self._by_hash)

    def names(self) -> list[str]:
        return sorted(k.name for k in self._by_hash.values())

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        try:
            runtime = self.store.read()
        except redis.RedisError as e:
            self.counters["store_fallbacks"] += 1
            self._warn.warn(f"api keys: metadata store unreachable ({e}); keeping the last {len(self)} keys")
            return
        self.counters["refreshes"] += 1
        if runtime == self._runtime:
            return
        if runtime.malformed:
            self.counters["malformed_entries"] += len(runtime.malformed)
            self._warn.warn(f"api keys: ignoring malformed entries in {self.store.key}: {list(runtime.malformed)}")
        before = set(self.names())
        self._by_hash, self._runtime = self._merge(runtime), runtime
        after = set(self.names())
        if before != after:
            log.info("api keys: %d in force (added %s, removed %s)", len(after), sorted(after - before) or "none",
                     sorted(before - after) or "none")

    def _merge(self, runtime: RuntimeKeys) -> dict[str, ApiKey]:
        keys = {**self.base, **runtime.added}
        for name in runtime.revoked:
            keys.pop(name, None)
        by_hash: dict[str, ApiKey] = {}
        for k in keys.values():
            if k.key_sha256 in by_hash:  # NOTE: one secret, two names: the lookup cannot tell them apart
                self._warn.warn(f"api keys: {k.name!r} and {by_hash[k.key_sha256].name!r} share a key_sha256; "
                                f"refusing both")
                by_hash[k.key_sha256] = _CONFLICT
                continue
            by_hash[k.key_sha256] = k
        return {h: k for h, k in by_hash.items() if k is not _CONFLICT}


_CONFLICT = ApiKey("conflict", "0" * 64)
