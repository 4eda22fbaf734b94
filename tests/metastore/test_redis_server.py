"""RedisServer: a private redis-server on a free loopback port; its URL serves, stop() ends the process and
removes its directory."""

from __future__ import annotations

import os

import pytest
import redis

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


def test_url_serves_and_stop_removes_process_and_directory() -> None:
    with RedisServer() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0" and server.port > 0
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "v")
            assert client.get("k") == b"v"
            assert client.config_get("save") == {"save": ""}  # no persistence
        finally:
            client.close()
        assert server.proc is not None and server.dir is not None
        pid, directory = server.proc.pid, server.dir
        assert os.path.isdir(directory)
    assert server.proc is None and server.dir is None and not os.path.exists(directory)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()  # stopping again is harmless


def test_two_servers_get_two_ports() -> None:
    with RedisServer() as a, RedisServer() as b:
        assert a.port != b.port


def test_a_missing_executable_names_the_way_out() -> None:
    with pytest.raises(RuntimeError, match="redis-server-nope not found on PATH: install redis-server"):
        RedisServer("redis-server-nope")
