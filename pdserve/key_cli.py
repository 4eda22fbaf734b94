"""`pdserve key`: make API keys and change a running cluster's keys (docs/api.md, "Authentication").

    pdserve key new --name NAME [--priority batch] [--tokens-per-minute N] [--requests-per-minute N]
        a new random key: the secret once (give it to its user), and its `auth.api_keys` YAML entry (SHA-256 only)
    pdserve key add --config FILE --name NAME [...]     a new key in Redis ({ns}:apikeys): routers accept it within 1 s
    pdserve key add --config FILE --name NAME --key-sha256 HEX [...]   the same for an existing secret's hash
    pdserve key revoke --config FILE --name NAME        refused by every router within 1 s (the YAML's key too)
    pdserve key forget --config FILE --name NAME        drop the runtime entry (addition or revocation)
    pdserve key list --config FILE                      the runtime entries

The cluster's Redis is `metastore.redis_url`, else the one in the cluster file `pdserve serve` wrote. Exits 0, or
prints one line on stderr and exits 2 (bad arguments, no cluster) or 1 (Redis failed).
"""

from __future__ import annotations

import argparse
import sys

import redis
import yaml

from metastore.api_keys import ApiKey, ApiKeyStore, KeyLimits, Priority, hash_key, new_secret


def add_arguments(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    key = sub.add_parser("key", help="make an API key, or add/revoke/list a running cluster's keys")
    ops = key.add_subparsers(dest="key_command", required=True)

    def entry(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", required=True, help="the key's name (logs, metrics, its rate-limit buckets)")
        p.add_argument("--priority", choices=[p.label for p in Priority], default=Priority.INTERACTIVE.label)
        p.add_argument("--tokens-per-minute", type=int, default=0, help="prompt + generated tokens (0: unlimited)")
        p.add_argument("--requests-per-minute", type=int, default=0, help="0: unlimited")

    def cluster(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="the serving YAML the cluster runs")

    new = ops.add_parser("new", help="print a new random key and its auth.api_keys YAML entry")
    entry(new)
    new.set_defaults(func=run, key_func=_new)
    add = ops.add_parser("add", help="add a key to a running cluster (Redis); prints the new secret")
    entry(add)
    cluster(add)
    add.add_argument("--key-sha256", help="the SHA-256 (hex) of an existing secret; default: make a new one")
    add.set_defaults(func=run, key_func=_add)
    for name, func, what in (("revoke", _revoke, "refuse a key on every router (the YAML's too)"),
                             ("forget", _forget, "drop a key's runtime entry (an addition or a revocation)")):
        p = ops.add_parser(name, help=what)
        cluster(p)
        p.add_argument("--name", required=True)
        p.set_defaults(func=run, key_func=func)
    lst = ops.add_parser("list", help="the runtime entries in Redis")
    cluster(lst)
    lst.set_defaults(func=run, key_func=_list)


def _entry(args: argparse.Namespace, sha256: str) -> ApiKey:
    return ApiKey(args.name, sha256, Priority.parse(args.priority), KeyLimits(args.tokens_per_minute,
                                                                         args.requests_per_minute))


def _yaml_entry(key: ApiKey) -> str:
    d = {"name": key.name, "key_sha256": key.key_sha256, "priority": key.priority.label}
    lim = key.limits
    if not lim.unlimited:
        d["limits"] = {"tokens_per_minute": lim.tokens_per_minute, "requests_per_minute": lim.requests_per_minute}
    return yaml.safe_dump([d], sort_keys=False)


def _store(args: argparse.Namespace) -> ApiKeyStore:
    from pdserve.config import ConfigError, MetastoreConfig, read_config_data
    from pdserve.runtime import find_redis_url

    # NOTE: only the metastore section: the machine an operator runs this on may lack the model directory
    section = read_config_data(args.config).get("metastore") or {}
    try:
        metastore = MetastoreConfig(**section)
    except TypeError as e:
        raise ConfigError(f"metastore: {e}") from None
    return ApiKeyStore(redis.Redis.from_url(find_redis_url(metastore), socket_timeout=5.0), metastore.namespace)


def _new(args: argparse.Namespace) -> int:
    secret = new_secret()
    key = _entry(args, hash_key(secret))
    print(f"key (shown once; give it to {key.name}): {secret}")
    print("auth.api_keys entry:")
    print(_yaml_entry(key), end="")
    return 0


def _add(args: argparse.Namespace) -> int:
    secret = None if args.key_sha256 else new_secret()
    key = _entry(args, args.key_sha256 or hash_key(secret or ""))
    _store(args).add(key)
    if secret is not None:
        print(f"key (shown once; give it to {key.name}): {secret}")
    print(f"added {key.name!r} ({key.priority.label}; {_limits(key.limits)}): the routers accept it within 1 s")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    _store(args).revoke(args.name)
    print(f"revoked {args.name!r}: every router refuses it within 1 s")
    return 0


def _forget(args: argparse.Namespace) -> int:
    found = _store(args).forget(args.name)
    print(f"dropped the runtime entry of {args.name!r}" if found else f"no runtime entry for {args.name!r}")
    return 0


def _list(args: argparse.Namespace) -> int:
    runtime = _store(args).read()
    for key in sorted(runtime.added.values(), key=lambda k: k.name):
        print(f"{key.name}\tadded\t{key.priority.label}\t{_limits(key.limits)}\t{key.key_sha256}")
    for name in sorted(runtime.revoked):
        print(f"{name}\trevoked")
    for name in runtime.malformed:
        print(f"{name}\tmalformed (ignored by the routers)")
    return 0


def _limits(lim: KeyLimits) -> str:
    if lim.unlimited:
        return "unlimited"
    return f"{lim.tokens_per_minute or 'unlimited'} tokens/min, {lim.requests_per_minute or 'unlimited'} requests/min"


def run(args: argparse.Namespace) -> int:
    """The chosen command; ConfigError/ValueError/no cluster: 2, Redis failed: 1."""
    from pdserve.config import ConfigError
    from pdserve.runtime import ClusterNotFoundError

    try:
        return int(args.key_func(args))
    except (ConfigError, ValueError, ClusterNotFoundError) as e:
        print(f"pdserve key: {e}", file=sys.stderr)
        return 2
    except redis.RedisError as e:
        print(f"pdserve key: Redis failed: {e}", file=sys.stderr)
        return 1
