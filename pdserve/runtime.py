"""How a router finds the cluster it serves: the Redis URL, the Ray GCS address and the Ray namespace.

From the configuration when it names both `metastore.redis_url` and `ray.address`; otherwise from the cluster
file that `pdserve serve` writes once Redis and Ray are up ($PDSERVE_RUNTIME_DIR/<metastore.namespace>.json,
by default under /tmp/pdserve) and removes on a clean stop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine import envs
from engine.processes import process_alive
from pdserve.config import MetastoreConfig, ServingConfig

log = logging.getLogger(__name__)

DEFAULT_RUNTIME_DIR = "/tmp/pdserve"


class ClusterNotFoundError(RuntimeError):
    """No running cluster to attach to; the message says where it was looked for."""


@dataclass(frozen=True)
class ClusterInfo:
    redis_url: str
    ray_address: str  # the GCS address ("host:port"), or whatever ray.address the configuration names
    ray_namespace: str
    controller_pid: int = 0  # the `pdserve serve` that wrote the file (0: from the configuration)


def ray_namespace(cfg: ServingConfig) -> str:
    """The Ray namespace of a deployment's named actors (one per metastore namespace)."""
    return f"pdserve-{cfg.metastore.namespace}"


def cluster_file(cfg: ServingConfig) -> Path:
    return cluster_file_of(cfg.metastore.namespace)


def cluster_file_of(namespace: str) -> Path:
    return Path(envs.PDSERVE_RUNTIME_DIR.get() or DEFAULT_RUNTIME_DIR) / f"{namespace}.json"


def find_redis_url(metastore: MetastoreConfig) -> str:
    """The cluster's Redis: the configuration's, else the running cluster's file's (ClusterNotFoundError). For
    tools that need only Redis (`pdserve key`), so not the whole configuration (nor the model directory)."""
    if metastore.redis_url:
        return metastore.redis_url
    path = cluster_file_of(metastore.namespace)
    info = _read(path)
    if info is None or not process_alive(info.controller_pid):
        raise ClusterNotFoundError(f"no running cluster: set metastore.redis_url, or start `pdserve serve` with "
                                   f"this configuration first (no live cluster file {path})")
    return info.redis_url


def write_cluster_file(cfg: ServingConfig, info: ClusterInfo) -> Path:
    path = cluster_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _read(path)
    if old is not None and process_alive(old.controller_pid) and old.controller_pid != info.controller_pid:
        log.warning("cluster file %s belongs to another running pdserve serve (pid %d); replacing it: "
                    "`pdserve router` will attach to this cluster", path, old.controller_pid)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(info)))
    os.replace(tmp, path)  # NOTE: atomic: a router starting now reads the old file or the new one, never half
    return path


def remove_cluster_file(cfg: ServingConfig, controller_pid: int) -> None:
    """Remove the cluster file if it is still this controller's (another may have replaced it)."""
    path = cluster_file(cfg)
    info = _read(path)
    if info is not None and info.controller_pid == controller_pid:
        path.unlink(missing_ok=True)


def find_cluster(cfg: ServingConfig) -> ClusterInfo:
    """The cluster a router attaches to: the configuration's when it names both Redis and Ray, else the cluster
    file's (ClusterNotFoundError when there is none, or its controller is gone)."""
    if cfg.metastore.redis_url and cfg.ray.address:
        return ClusterInfo(cfg.metastore.redis_url, cfg.ray.address, ray_namespace(cfg))
    path = cluster_file(cfg)
    info = _read(path)
    if info is None:
        raise ClusterNotFoundError(f"no running cluster: set metastore.redis_url and ray.address, or start "
                                   f"`pdserve serve` with this configuration first (no cluster file {path})")
    if not process_alive(info.controller_pid):
        raise ClusterNotFoundError(f"no running cluster: the pdserve serve (pid {info.controller_pid}) that wrote "
                                   f"{path} is gone")
    return info


def _read(path: Path) -> ClusterInfo | None:
    try:
        return ClusterInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("ignoring unreadable cluster file %s: %s", path, e)
        return None
