"""The serving configuration: one YAML file, validated once on load. Every error names the key it is about.

The `engine:` section is `engine.config.EngineConfig` itself: its keys are EngineConfig's fields (read from the
dataclass, never re-declared here) and its checks are EngineConfig's. Only `tensor_parallel_size` lives
elsewhere, per pool (`pools.{prefill,decode}.tensor_parallel_size`); `ServingConfig.pool_engine(role)` is the
engine configuration of one pool. A file may start from another with `base: other.yaml` (see `load_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config import EngineConfig
from kv_transfer.config import TransferConfig
from metastore.api_keys import ApiKey, check_unique
from metastore.policy import PlacementPolicy
from router.admission import AdmissionConfig


class ConfigError(ValueError):
    """A bad serving configuration; the message starts with the dotted key path."""


# NOTE: by default an instance asks for a sliver of its pool's node resource, not all of it: `--resources
# '{"node_b": 1}'` then places up to 1000 instances (of any pool pinned to it) on that node; the node's own CPU/GPU
# counts still bound how many really fit. `max_per_node` makes the sliver larger.
MAX_PER_NODE_DEFAULT = 1000
MAX_PER_NODE_LIMIT = 10_000  # NOTE: Ray keeps resource amounts to 4 decimals


def node_resource_share(max_per_node: int) -> float:
    """What one instance asks of its pool's node resource: `max_per_node` of them fit in one unit. NOTE: rounded
    down to Ray's 4 decimals, so that max_per_node of them really fit (1/3 -> 0.3333)."""
    return int(10_000 / max_per_node) / 10_000

RAY_PREDEFINED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass
class PoolConfig:
    replicas: int = 1  # instances in this pool (prefill replicas : decode replicas is the P/D ratio)
    tensor_parallel_size: int = 1  # checked by EngineConfig (ServingConfig.check builds each pool's engine)
    # Pin the pool's instances to Ray nodes that offer this custom resource (`ray start --resources
    # '{"node_b": 1}'`); None: Ray places them anywhere. Each instance takes 1/max_per_node of it.
    node_resource: str | None = None
    # At most this many of the pool's instances on one node: each asks for 1/max_per_node of `node_resource`, of
    # which each node offers 1 (`--resources '{"decode_slot": 1}'` on every node, max_per_node: 1 spreads the
    # pool one instance per node, so that losing a node loses only part of it). Needs node_resource.
    max_per_node: int = MAX_PER_NODE_DEFAULT
    # The share of one GPU each instance's Ray actor asks for (TP 1 only): 0.5 packs two instances on a GPU.
    # NOTE: sharing instances split the GPU's time and memory; each needs its own KV size (checked in `check`).
    gpus_per_instance: float = 1.0

    def __post_init__(self) -> None:
        if self.node_resource is not None and (not self.node_resource.strip() or self.node_resource in
                                               RAY_PREDEFINED_RESOURCES):
            raise ValueError(f"node_resource: {self.node_resource!r} must name a custom Ray resource (not empty, "
                             f"not one of {', '.join(RAY_PREDEFINED_RESOURCES)})")
        if not 1 <= self.max_per_node <= MAX_PER_NODE_LIMIT:
            raise ValueError(f"max_per_node: {self.max_per_node} must be in 1..{MAX_PER_NODE_LIMIT}")
        if self.max_per_node != MAX_PER_NODE_DEFAULT and self.node_resource is None:
            raise ValueError("max_per_node needs node_resource (the resource whose unit it divides)")
        if not 0.0 < self.gpus_per_instance <= 1.0:
            raise ValueError(f"gpus_per_instance: {self.gpus_per_instance} must be in (0, 1] (more GPUs per "
                             "instance: tensor_parallel_size)")
        if self.gpus_per_instance < 1.0 and self.tensor_parallel_size > 1:
            raise ValueError(f"gpus_per_instance: {self.gpus_per_instance} needs tensor_parallel_size 1 (a TP "
                             "group takes whole GPUs, one per rank)")

    def actor_resources(self) -> dict[str, float]:
        """The `resources=` of each instance's Ray actor options."""
        return {self.node_resource: node_resource_share(self.max_per_node)} if self.node_resource else {}


@dataclass
class PoolsConfig:
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)


@dataclass
class MetastoreConfig:
    redis_url: str | None = None  # None: start a private redis-server on a free loopback port
    namespace: str = "pdserve"
    registry_lease_s: float = 10.0  # an instance without heartbeats leaves the registry after this long

    def __post_init__(self) -> None:
        if self.registry_lease_s <= 0:
            raise ValueError(f"registry_lease_s: {self.registry_lease_s} must be > 0")


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS, else start a local Ray


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port; router i of `routers` listens on port + i
    # Prometheus /metrics of each router (HTTP). 0 picks a free port per router; else router i uses metrics_port + i.
    metrics_port: int = 0
    # The OpenAI-compatible HTTP API of each router (router/openai_api.py). None: off; 0 picks a free port per
    # router; else router i uses http_port + i.
    http_port: int | None = None
    model_name: str | None = None  # the model's id in the HTTP API; None: the basename of engine.model
    # gRPC routers. 1: in the `pdserve serve` process. N >= 2: `pdserve serve` is the controller (Redis, Ray, the
    # pools) and supervises N router processes, each attached to the same Ray cluster and Redis.
    routers: int = 1
    max_inflight: int = 256  # requests the router serves at once; more wait in its admission queue
    # Requests that may wait for one of the max_inflight slots, admitted by priority class then age; beyond, or
    # after admission_timeout_s of waiting, RESOURCE_EXHAUSTED. 0: no queue (refused at once).
    max_queued: int = 0
    admission_timeout_s: float = 30.0
    # A text prompt over this many UTF-8 bytes is refused (INVALID_ARGUMENT) before it is tokenized.
    max_prompt_bytes: int = 1 << 20
    # A prefill call unanswered after this long goes to another prefill instance, else the decode instance.
    prefill_timeout_s: float = 30.0
    max_migrations: int = 2  # decode instances a stream may move off (each lost under it) before UNAVAILABLE
    # Layer-wise KV streaming: a disaggregated request's decode call goes out with its prefill call, and the
    # decode instance reads each layer group of the prompt's KV as it is computed (router/layer_wise.py).
    layer_wise_kv: bool = True
    breaker_threshold: int = 3  # failures in a row that open an instance's circuit breaker (death: the first)
    breaker_cooldown_s: float = 5.0  # an open breaker lets one probe request through after this long
    # On SIGTERM: new requests are refused at once; those in flight (and KV held for a reader) get this long.
    # Also the bound of one instance's drain when it is removed or switches role (`pdserve scale`, `role`).
    drain_timeout_s: float = 30.0
    # A draining instance has left the registry; it keeps serving for at least this long what routers placed on
    # it before they saw that (they re-read the registry every 0.2 s; a remote prefill delays the decode call).
    drain_grace_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight: {self.max_inflight} must be >= 1")
        if self.max_queued < 0 or self.admission_timeout_s <= 0:
            raise ValueError(f"max_queued: {self.max_queued} must be >= 0 and admission_timeout_s: "
                             f"{self.admission_timeout_s} > 0")
        if self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes: {self.max_prompt_bytes} must be >= 1")
        for name in ("prefill_timeout_s", "breaker_cooldown_s", "drain_timeout_s", "drain_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be > 0")
        if self.max_migrations < 0 or self.breaker_threshold < 1:
            raise ValueError("max_migrations must be >= 0 and breaker_threshold >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port (0 picks a free one)")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port: {self.metrics_port} is not a TCP port (0 picks a free one)")
        if self.metrics_port and self.metrics_port + self.routers - 1 > 65535:
            raise ValueError(f"metrics_port: {self.routers} routers from port {self.metrics_port} go past 65535")
        if self.http_port is not None and not 0 <= self.http_port <= 65535 - (self.routers - 1 if self.http_port
                                                                             else 0):
            raise ValueError(f"http_port: {self.http_port} is not a TCP port for {self.routers} routers (0 picks a "
                             "free one)")
        if self.routers < 1:
            raise ValueError(f"routers: {self.routers} must be >= 1")
        if self.port and self.port + self.routers - 1 > 65535:
            raise ValueError(f"routers: {self.routers} routers from port {self.port} go past port 65535")


@dataclass
class AdaptiveConfig:
    """The adaptive P/D split (pdserve/adaptive_split.py): re-plan the split from the live workload and move
    instances between the pools by role switches. Off unless `enabled`."""

    enabled: bool = False
    profile: str | None = None  # `pdserve profile` output for this engine (required when enabled)
    slo_ttft_ms: float = 500.0
    slo_tpot_ms: float = 50.0
    interval_s: float = 10.0  # re-plan this often
    window_s: float = 30.0  # from the workload of the last window_s seconds
    min_requests: int = 20  # no re-plan from a window with fewer finished requests
    patience: int = 2  # consecutive re-plans that must agree before a change
    min_gain: float = 0.1  # a change must predict at least this much more goodput (0.1 = 10%)
    cooldown_s: float = 30.0  # no further change for this long after one
    calibrate_step_time: bool = True  # scale the profile by the measured step-time ratio (step_slowdown)

    def __post_init__(self) -> None:
        if self.enabled and not self.profile:
            raise ValueError("profile: the adaptive split needs a profile (pdserve profile --out FILE)")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "interval_s", "window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be > 0")
        if self.patience < 1 or self.min_requests < 1 or self.min_gain < 0 or self.cooldown_s < 0:
            raise ValueError("patience and min_requests must be >= 1, min_gain and cooldown_s >= 0")


@dataclass
class TlsConfig:
    """TLS for both fronts of every router (gRPC and HTTP): PEM files, read when each router starts."""

    cert: str  # the certificate chain
    key: str  # its private key

    def __post_init__(self) -> None:
        for name in ("cert", "key"):
            path = getattr(self, name)
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise ValueError(f"{name}: {path!r} is not a readable file")


@dataclass
class AuthConfig:
    """API keys and TLS of the routers' fronts (docs/api.md, "Authentication")."""

    # None (no `api_keys`): the routers are open to anyone reaching their ports. A list (even empty): a call
    # needs `authorization: Bearer KEY` with one of these keys or one added at runtime in Redis.
    api_keys: list[ApiKey] | None = None
    tls: TlsConfig | None = None  # None: plaintext

    def __post_init__(self) -> None:
        if self.api_keys is not None:
            check_unique(self.api_keys)


@dataclass
class ServingConfig:
    engine: EngineConfig  # every instance's engine, at tensor_parallel_size 1 (see pool_engine)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    placement: PlacementPolicy = field(default_factory=PlacementPolicy)
    kv_transfer: TransferConfig = field(default_factory=TransferConfig)
    metastore: MetastoreConfig = field(default_factory=MetastoreConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # early rejection (router/admission.py)

    def pool_engine(self, role: str) -> EngineConfig:
        """The engine configuration of every instance of pool `role` ("prefill" or "decode")."""
        pool: PoolConfig = getattr(self.pools, role)
        return dataclasses.replace(self.engine, tensor_parallel_size=pool.tensor_parallel_size)

    def check(self) -> None:
        for role, min_replicas in (("prefill", 0), ("decode", 1)):  # 0 prefill replicas = aggregated serving
            pool: PoolConfig = getattr(self.pools, role)
            if pool.replicas < min_replicas:
                raise ConfigError(f"pools.{role}.replicas: {pool.replicas} must be >= {min_replicas}")
            try:
                self.pool_engine(role)
            except ValueError as e:
                msg = str(e)
                if msg.startswith("tensor_parallel_size:"):
                    raise ConfigError(f"pools.{role}.{msg}") from None
                raise ConfigError(f"engine.{msg} (at pools.{role}.tensor_parallel_size "
                                  f"{pool.tensor_parallel_size})") from None
            engine = self.engine
            if (pool.gpus_per_instance < 1.0 and engine.device != "cpu" and engine.kv_cache_memory_bytes is None
                    and engine.num_kv_blocks is None):
                # NOTE: gpu_memory_utilization reads the GPU's free memory at start; instances sharing a GPU
                # start together and would each count the others' share as theirs.
                raise ConfigError(f"pools.{role}.gpus_per_instance: {pool.gpus_per_instance} shares a GPU; set "
                                  "engine.kv_cache_memory_bytes (or engine.num_kv_blocks) so that each sharing "
                                  "instance's KV cache has a fixed size")


# Keys a section does not take although the dataclass has the field: key -> where it is set instead.
_ELSEWHERE: dict[type, dict[str, str]] = {
    EngineConfig: {"tensor_parallel_size": "set per pool: pools.prefill.tensor_parallel_size and "
                                           "pools.decode.tensor_parallel_size"},
}
# Keys of earlier versions of this file: dotted key -> what replaced it.
_RENAMED: dict[str, str] = {
    "placement.adaptive": "the adaptive P/D split has its own section: adaptive.enabled (docs/configuration.md)",
    "metastore.lease_s": "renamed to metastore.registry_lease_s",
    "kv_transfer.lease_s": "renamed to kv_transfer.held_kv_lease_s",
    "scheduler": "its keys moved into the engine section (engine.max_num_seqs, engine.max_num_batched_tokens, ...)",
    **{f.name: _ELSEWHERE[EngineConfig].get(f.name, f"moved to engine.{f.name}")
       for f in dataclasses.fields(EngineConfig) if f.init},
}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ServingConfig:
    """Read and validate a serving YAML. `overrides` maps dotted keys to values (e.g. {"engine.model": "/m"}).

    A top-level `base: other.yaml` (relative to the including file) loads that file first and merges this one
    over it: mappings merge key by key, any other value replaces the base's. Bases may chain; a cycle is an
    error."""
    return build_config(read_config_data(path), overrides)


def read_config_data(path: str | Path) -> dict[str, Any]:
    """A serving YAML's mapping with its `base:` chain merged, unvalidated (`pdserve apply` sends it)."""
    return _read(Path(path), ())


def build_config(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> ServingConfig:
    """Validate a serving YAML's mapping (as `read_config_data` returns it) with `overrides` applied."""
    data = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    config = _build(ServingConfig, data, "")
    config.check()
    return config


def _read(path: Path, including: tuple[Path, ...]) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base: {base!r} is not a file name (in {path})")
    chain = (*including, path.resolve())
    base_path = path.parent / base
    if base_path.resolve() in chain:
        raise ConfigError(f"base: {base} includes itself ({' -> '.join(p.name for p in (*chain, base_path))})")
    merged = _read(base_path, chain)
    merge_mappings(merged, data)
    return merged


def merge_mappings(base: dict[str, Any], over: dict[str, Any]) -> None:
    """Deep-merge `over` into `base` in place: nested mappings merge, anything else replaces."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_mappings(base[key], value)
        else:
            base[key] = value


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'configuration'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    elsewhere = _ELSEWHERE.get(cls, {})
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in elsewhere}
    for name in sorted(set(data) - set(known)):
        key = f"{path}.{name}" if path else name
        why = elsewhere.get(name) or _RENAMED.get(key) or f"unknown key (known here: {', '.join(known)})"
        raise ConfigError(f"{key}: {why}")
    values = {}
    for name, f in known.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        values[name] = _convert(hints[name], data[name], key)
    try:
        return cls(**values)  # each section validates itself here (EngineConfig, TransferConfig, ...)
    except ValueError as e:
        # NOTE: the sections' messages start with their field name ("max_num_seqs: 0 must be >= 1"): prefix
        # the section's path so the message names the YAML key.
        msg = str(e)
        if msg.split(":", 1)[0] in known:
            raise ConfigError(f"{path}.{msg}" if path else msg) from None
        raise ConfigError(f"{path or 'configuration'}: {msg}") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)  # type: ignore[arg-type]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        parse = getattr(tp, "parse", tp)  # NOTE: an enum with a `parse` (engine.priority.Priority) is named by it
        try:
            return parse(value)
        except (ValueError, TypeError, AttributeError):
            raise ConfigError(f"{key}: {value!r} is not one of {[getattr(m, 'label', m.value) for m in tp]}") \
                from None
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and value is not None:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: {value!r} is not a {tp.__name__}")
    return value
