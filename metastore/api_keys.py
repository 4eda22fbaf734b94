"""API keys: the typed entry of one key (its name, the SHA-256 of its secret, its priority class and its limits)
and the runtime keys in Redis.

    {ns}:apikeys   HASH  key name -> ApiKey JSON, or {"revoked": true} (a tombstone)

The serving YAML's `auth.api_keys` are the base; the hash overlays them: an entry added at runtime adds a key or
replaces the YAML's of that name, a tombstone revokes a name (the YAML's too). NOTE: an overlay rather than the
YAML's keys copied into Redis at start: a router that restarts, or a Redis that restarts empty, never brings a
revoked key back (a tombstone is only lost with the whole hash, which then leaves the YAML's keys, the configured
state), and no router has to be the one that seeds. Routers read the hash every `refresh_s` (router/auth.py).

Only the SHA-256 of a key's secret is stored anywhere (YAML, Redis); the secret is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field

import redis

# NOTE: a key's class is the engines' own (engine/priority.py), re-exported here for the key's users
from engine.priority import Priority

KEY_PREFIX = "pdsk-"  # NOTE: a recognisable prefix, so a leaked key is easy to find in logs and repositories
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a Redis key part and a metric label value
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TOMBSTONE = json.dumps({"revoked": True})



@dataclass(frozen=True)
class KeyLimits:
    """Per-key token buckets, each refilled evenly over a minute; 0: unlimited (router/rate_limit.py)."""

    tokens_per_minute: int = 0  # prompt + generated tokens
    requests_per_minute: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens_per_minute", "requests_per_minute"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: {value!r} must be an integer >= 0 (0: unlimited)")

    @property
    def unlimited(self) -> bool:
        return not self.tokens_per_minute and not self.requests_per_minute


@dataclass(frozen=True)
class ApiKey:
    name: str  # who the key belongs to: logs, metrics labels, the rate-limit buckets' Redis keys
    key_sha256: str  # the SHA-256 of the secret, 64 lowercase hex digits (`pdserve key new` prints both)
    priority: Priority = Priority.INTERACTIVE
    limits: KeyLimits = field(default_factory=KeyLimits)
    admin: bool = False  # may call the Admin service (scale, role, drain, apply); other keys get PERMISSION_DENIED

    def __post_init__(self) -> None:
        if not isinstance(self.admin, bool):
            raise ValueError(f"admin: {self.admin!r} must be true or false")
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise ValueError(f"name: {self.name!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not isinstance(self.key_sha256, str) or not SHA256_RE.match(self.key_sha256):
            raise ValueError(f"key_sha256: {self.key_sha256!r} is not a SHA-256 in hex (64 lowercase hex digits; "
                             "`pdserve key new` prints one)")
        if not isinstance(self.priority, Priority):
            raise ValueError(f"priority: {self.priority!r} is not one of {[p.label for p in Priority]}")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "priority": self.priority.label})

    @staticmethod
    def from_json(text: str | bytes) -> ApiKey:
        d = json.loads(text)
        try:
            priority = Priority.parse(d.get("priority", Priority.INTERACTIVE.label))
        except ValueError:
            raise ValueError(f"priority: {d.get('priority')!r} is not one of {[p.label for p in Priority]}") from None
        return ApiKey(d["name"], d["key_sha256"], priority, KeyLimits(**d.get("limits", {})), d.get("admin", False))


def hash_key(secret: str) -> str:
    """The SHA-256 (hex) a key's entry stores for `secret`."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A new random key: 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_unique(keys: list[ApiKey]) -> None:
    """ValueError on two entries with one name or one secret."""
    names, hashes = set(), set()
    for k in keys:
        if k.name in names:
            raise ValueError(f"api_keys: the name {k.name!r} is used twice")
        if k.key_sha256 in hashes:
            raise ValueError(f"api_keys: {k.name!r} has the same key_sha256 as another key")
        names.add(k.name)
        hashes.add(k.key_sha256)


@dataclass(frozen=True)
class RuntimeKeys:
    """The hash's state: keys added (or replaced) at runtime, and names revoked."""

    added: dict[str, ApiKey]
    revoked: frozenset[str]
    malformed: tuple[str, ...] = ()  # names whose entry did not parse (left out, so not usable)


class ApiKeyStore:
    """The runtime keys' hash. Takes a redis client (the metadata store's); every call is one Redis command."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.r, self.key = client, f"{namespace}:apikeys"

    def add(self, key: ApiKey) -> None:
        self.r.hset(self.key, key.name, key.to_json())

    def revoke(self, name: str) -> None:
        self.r.hset(self.key, name, TOMBSTONE)

    def forget(self, name: str) -> bool:
        """Drop the name's runtime entry (an addition or a tombstone): the YAML's entry, if any, applies again."""
        return bool(self.r.hdel(self.key, name))

    def read(self) -> RuntimeKeys:
        added, revoked, malformed = {}, set(), []
        for raw_name, raw in self.r.hgetall(self.key).items():
            name = raw_name.decode()
            try:
                if json.loads(raw).get("revoked"):
                    revoked.add(name)
                    continue
                entry = ApiKey.from_json(raw)
                if entry.name != name:
                    raise ValueError(f"the entry's name {entry.name!r} is not its field's")
                added[name] = entry
            except (ValueError, KeyError, TypeError, AttributeError):
                malformed.append(name)
        return RuntimeKeys(added, frozenset(revoked), tuple(malformed))
