"""RedisServer: a private redis-server on a free loopback port; its URL serves, stop() ends the process and
removes its directory."""

from __future__ import annotations

import os

import pytest

from metastore import InstanceInfo, MetadataStore, RedisServer


def info(i: str, role: str = "decode") -> InstanceInfo:
    return InstanceInfo(instance_id=i, role=role, address=f"actor-{i}", tp_size=1, block_size=16, num_blocks=100,
                        max_num_seqs=8)


def test_private_redis_server_stops_cleanly() -> None:
    server = RedisServer().start()
    pid = server.proc.pid if server.proc else 0
    MetadataStore(server.url).register(info("z"))
    server.stop()

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
