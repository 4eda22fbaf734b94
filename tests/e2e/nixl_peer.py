"""One side of a NIXL (UCX) KV read between two network nodes, for tests/e2e/test_multinode.py; each side runs
in its own namespace (`ip netns exec`). The holder fills a KV cache, listens on its node's address and sends its
agent descriptor and each block's SHA-256; the reader connects, READs blocks through `TransferAgent` (the
production path) and prints one JSON line: the read's state and whether every block is byte-identical.

    python -m tests.e2e.nixl_peer holder IP PORT BLOCKS
    python -m tests.e2e.nixl_peer reader IP PORT BLOCKS
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from multiprocessing.connection import Client, Connection, Listener

import torch

from engine.kv_cache import KVCache, KVLayout
from kv_transfer.agent import TransferAgent
from kv_transfer.config import TransferConfig
from kv_transfer.read_state import ReadStatus

AUTH = b"pdserve-multinode-test"
TIMEOUT_S = 30.0


def make(name: str, num_blocks: int) -> tuple[KVCache, TransferAgent]:
    layout = KVLayout(num_blocks=num_blocks, num_kv_heads=2, num_layers=4, block_size=16, head_dim=64,
                      element_size=4)
    cache = KVCache(layout, torch.float32, "cpu")
    # NOTE: UCX_TLS=tcp: two namespaces of one host could still reach each other through shared memory (cma);
    # a real second node cannot, and TCP is the path this test is about.
    agent = TransferAgent(cache, name, 0, 1, 2, "float32", "multinode-test", TransferConfig(ucx_tls="tcp"))
    return cache, agent


def digests(cache: KVCache, blocks: range) -> list[str]:
    return [hashlib.sha256(cache.block(b).contiguous().numpy().tobytes()).hexdigest() for b in blocks]


def holder(ip: str, port: int, n: int) -> None:
    cache, agent = make("holder", n)
    cache.tensor.normal_()
    with Listener((ip, port), authkey=AUTH) as listener, listener.accept() as conn:
        conn.send((agent.describe().to_json(), digests(cache, range(n))))
        deadline = time.monotonic() + TIMEOUT_S
        while not conn.poll(0.001) and time.monotonic() < deadline:
            agent.receive()  # serve the agent, as the prefill worker's loop does
    agent.close()


def connect(ip: str, port: int) -> Connection:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return Client((ip, port), authkey=AUTH)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def reader(ip: str, port: int, n: int) -> None:
    from kv_transfer.descriptor import AgentDescriptor

    cache, agent = make("reader", n)
    with connect(ip, port) as conn:
        remote_json, sums = conn.recv()
        remote = AgentDescriptor.from_json(remote_json)
        local = list(range(n))[::-1]  # a permutation: block i lands in block n-1-i
        t0 = time.monotonic()
        error = agent.start_read("x", [remote], local, list(range(n)))
        while error is None and (state := agent.poll(["x"])["x"]).status is ReadStatus.IN_FLIGHT:
            time.sleep(0.001)
        seconds = time.monotonic() - t0
        ok = error is None and state.status is ReadStatus.DONE
        got = digests(cache, range(n))[::-1]
        conn.send("done")
    print(json.dumps({"done": ok, "error": str(error or (None if ok else state.error)), "seconds": seconds,
                      "identical": got == sums, "remote_node_ip": remote.node_ip}), flush=True)
    agent.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    role, addr, port, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    (holder if role == "holder" else reader)(addr, port, blocks)
