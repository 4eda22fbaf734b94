"""KV transfer bandwidth between two network nodes (UCX TCP by default), as a ratio to a plain TCP socket copy of
the same bytes between the same two nodes, measured in the same run.

The holder owns a KV cache of Llama-3-8B's KV geometry (bench/kv_transfer_bandwidth.py: 2 MiB blocks) and a NIXL
agent; the reader pulls N blocks through the production path (TransferAgent + plan_reads + NIXL READ), in runs
("contiguous") and one descriptor per block ("scattered"). Baseline: the holder `sendall`s the same number of
bytes from its cache over one TCP connection and the reader `recv_into`s them (kernel TCP, no UCX).

    python bench/kv_transfer_network.py --listen 10.0.0.2:7100                      # on node B (holder)
    python bench/kv_transfer_network.py --connect 10.0.0.2:7100 --sizes-mb 64 256   # on node A (reader)
    python bench/kv_transfer_network.py --netns --sizes-mb 64 256   # both here, two network namespaces (root)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.kv_transfer_bandwidth import BLOCK, HEAD_DIM, KV_HEADS, LAYERS, make_agent, make_cache, timed_read
from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import AgentDescriptor

AUTH = b"pdserve-bench"
BLOCK_BYTES = KV_HEADS * LAYERS * 2 * BLOCK * HEAD_DIM * 2


def holder(ip: str, port: int, num_blocks: int, cfg: TransferConfig) -> None:
    cache = make_cache(num_blocks, "cpu")
    cache.tensor.normal_()
    agent = make_agent(cache, "holder", cfg)
    raw = memoryview(cache.tensor.view(-1).view(torch.uint8).numpy())  # the cache's bytes, no copy
    sums = cache.block_sums()
    with socket.create_server((ip, port + 1)) as data_server, Listener((ip, port), authkey=AUTH) as listener:
        with listener.accept() as conn:
            data, _ = data_server.accept()
            conn.send((agent.describe().to_json(), sums))
            while True:
                if not conn.poll(0.001):
                    agent.receive()  # serve the agent, as the prefill worker's loop does
                    continue
                msg = conn.recv()
                if msg == "done":
                    break
                data.sendall(raw[: int(msg)])  # the baseline: `msg` bytes of the cache over plain TCP
            data.close()
    agent.close()


def socket_copy(conn: Connection, data: socket.socket, buf: memoryview, nbytes: int) -> float:
    t0 = time.perf_counter()
    conn.send(nbytes)
    got = 0
    while got < nbytes:
        n = data.recv_into(buf[got:nbytes])
        if n == 0:
            raise ConnectionError("holder closed the data connection")
        got += n
    return time.perf_counter() - t0


def reader(ip: str, port: int, sizes_mb: list[int], iters: int, cfg: TransferConfig) -> list[dict[str, Any]]:
    max_blocks = max(sizes_mb) * 2**20 // BLOCK_BYTES
    cache = make_cache(2 * max_blocks, "cpu")
    agent = make_agent(cache, "reader", cfg)
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = Client((ip, port), authkey=AUTH)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    data = socket.create_connection((ip, port + 1))
    remote_json, sums = conn.recv()
    remote = AgentDescriptor.from_json(remote_json)
    buf = memoryview(bytearray(max(sizes_mb) << 20))
    rows = []
    for mb in sizes_mb:
        n = mb * 2**20 // BLOCK_BYTES
        runs = [b for s in range(0, 2 * max_blocks, 32) for b in range(s, s + 16)][:n]
        scattered = [(i * 7919) % (2 * max_blocks) for i in range(n)]  # distinct: 7919 is prime to the count
        row: dict[str, Any] = {"size_mb": mb, "blocks": n}
        for label, src in (("contiguous", runs), ("scattered", scattered)):
            secs, _post, descs = timed_read(agent, remote, list(range(n)), src, iters, f"{label}{mb}")
            ok = all(abs(cache.block(i).float().sum().item() - sums[s]) < 1e-3 * max(1.0, abs(sums[s]))
                     for i, s in enumerate(src[:8]))
            row[label] = {"seconds": secs, "GBps": n * BLOCK_BYTES / secs / 1e9, "descriptors": descs,
                          "verified": ok}
        socket_copy(conn, data, buf, n * BLOCK_BYTES)  # warm-up
        tcp = statistics.median(socket_copy(conn, data, buf, n * BLOCK_BYTES) for _ in range(iters))
        row["tcp_socket"] = {"seconds": tcp, "GBps": n * BLOCK_BYTES / tcp / 1e9}
        for label in ("contiguous", "scattered"):
            row[label]["ratio_to_tcp_socket"] = tcp / row[label]["seconds"]
        rows.append(row)
        print(f"{mb:5d} MB: TCP socket {row['tcp_socket']['GBps']:5.2f} GB/s | " + " | ".join(
            f"{k} {row[k]['GBps']:5.2f} GB/s = {row[k]['ratio_to_tcp_socket']:.2f}x socket ({row[k]['descriptors']} "
            f"descs, verified {row[k]['verified']})" for k in ("contiguous", "scattered")), flush=True)
    conn.send("done")
    conn.close()
    data.close()
    agent.close()
    return rows


def in_namespaces(argv: list[str]) -> int:
    """Run the holder in namespace B and the reader in namespace A of a fresh tests/e2e/netns.py pair."""
    from tests.e2e.netns import NodePair

    root = Path(__file__).resolve().parents[1]
    me = [sys.executable, str(Path(__file__).resolve())]
    with NodePair() as nodes:
        env_a, env_b = ({**os.environ, "PYTHONPATH": str(root), "PDSERVE_NODE_IP": n.ip} for n in (nodes.a, nodes.b))
        addr = f"{nodes.b.ip}:7100"
        holder_proc = subprocess.Popen(nodes.cmd(nodes.b, *me, "--listen", addr, *argv), env=env_b)
        try:
            return subprocess.run(nodes.cmd(nodes.a, *me, "--connect", addr, *argv), env=env_a,
                                  timeout=600).returncode
        finally:
            holder_proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", help="IP:PORT: be the holder (PORT+1 carries the socket baseline)")
    where.add_argument("--connect", help="IP:PORT of the holder: be the reader")
    where.add_argument("--netns", action="store_true", help="both, here, in two network namespaces (root)")
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ucx-tls", default="tcp")
    ap.add_argument("--progress-thread", action="store_true", help="NIXL's progress thread in both agents")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.netns:
        rest = ["--sizes-mb", *map(str, args.sizes_mb), "--iters", str(args.iters), "--ucx-tls", args.ucx_tls,
                *(["--progress-thread"] if args.progress_thread else [])]
        sys.exit(in_namespaces(rest + (["--json", args.json] if args.json else [])))
    cfg = TransferConfig(ucx_tls=args.ucx_tls, progress_thread=args.progress_thread or None)
    ip, port = (args.listen or args.connect).rsplit(":", 1)
    if args.listen:
        holder(ip, int(port), 2 * (max(args.sizes_mb) * 2**20 // BLOCK_BYTES), cfg)
        return
    rows = reader(ip, int(port), args.sizes_mb, args.iters, cfg)
    if args.json:
        env = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
        with open(args.json, "w") as f:
            json.dump({"ucx_tls": args.ucx_tls, "ucx_env": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
