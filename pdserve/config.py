"""The serving configuration: one YAML file, validated on load. Every error names the key it is about."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kv_transfer.config import TransferConfig
from metastore.policy import PlacementPolicy


class ConfigError(ValueError):
    """A bad serving configuration; the message starts with the dotted key path."""


@dataclass
class PoolConfig:
    replicas: int = 1  # instances in this pool (prefill replicas : decode replicas is the P/D ratio)
    tensor_parallel_size: int = 1

    def check(self, path: str, min_replicas: int) -> None:
        if self.replicas < min_replicas:
            raise ConfigError(f"{path}.replicas: {self.replicas} must be >= {min_replicas}")
        if self.tensor_parallel_size not in (1, 2, 4, 8):
            raise ConfigError(f"{path}.tensor_parallel_size: {self.tensor_parallel_size} is not one of 1, 2, 4, 8")


@dataclass
class PoolsConfig:
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None  # per rank; default: the engine's (GPU: gpu_memory_utilization)
    gpu_memory_utilization: float = 0.85


@dataclass
class MetastoreConfig:
    redis_url: str | None = None  # None: start a private redis-server on a free loopback port
    namespace: str = "pdserve"
    lease_s: float = 10.0  # an instance without heartbeats leaves the registry after this long


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS, else start a local Ray


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    max_inflight: int = 256  # requests the router serves at once; more are refused with RESOURCE_EXHAUSTED


@dataclass
class ServingConfig:
    model: str
    load_format: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    device: str = "auto"
    attention_backend: str = "auto"  # auto | torch | triton | flash-attn
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    placement: PlacementPolicy = field(default_factory=PlacementPolicy)
    kv_transfer: TransferConfig = field(default_factory=TransferConfig)
    metastore: MetastoreConfig = field(default_factory=MetastoreConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def check(self) -> None:
        bs = self.block_size
        if bs <= 0 or bs & (bs - 1):
            raise ConfigError(f"block_size: {bs} is not a positive power of two")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ConfigError(f"load_format: {self.load_format!r} is not one of auto, safetensors, dummy")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype: {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        from engine.attention import BACKEND_NAMES

        if self.attention_backend not in (*BACKEND_NAMES, "auto"):
            raise ConfigError(f"attention_backend: {self.attention_backend!r} is not one of auto, "
                              f"{', '.join(BACKEND_NAMES)}")
        self.pools.prefill.check("pools.prefill", 0)  # 0 prefill replicas = aggregated serving
        self.pools.decode.check("pools.decode", 1)
        for key, value in (("scheduler.max_num_seqs", self.scheduler.max_num_seqs),
                           ("scheduler.max_num_batched_tokens", self.scheduler.max_num_batched_tokens)):
            if value < 1:
                raise ConfigError(f"{key}: {value} must be >= 1")
        if self.server.max_inflight < 1:
            raise ConfigError(f"server.max_inflight: {self.server.max_inflight} must be >= 1")
        if not 0 <= self.server.port <= 65535:
            raise ConfigError(f"server.port: {self.server.port} is not a TCP port (0 picks a free one)")
        if self.metastore.lease_s <= 0:
            raise ConfigError("metastore.lease_s: must be > 0")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ServingConfig:
    """Read and validate a serving YAML. `overrides` maps dotted keys to values (e.g. {"server.port": 0})."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    config = _build(ServingConfig, data, "")
    config.check()
    return config


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'configuration'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known here: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        values[name] = _convert(hints[name], data[name], key)
    try:
        return cls(**values)  # sections with their own validation (PlacementPolicy, TransferConfig) run it here
    except ValueError as e:
        raise ConfigError(f"{path or 'configuration'}: {e}") from None


def _convert(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: {value!r} is not a {tp.__name__}")
    return value
