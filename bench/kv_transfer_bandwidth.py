"""KV transfer bandwidth through the production path (TransferAgent + plan_reads + NIXL READ), as a ratio to a
plain copy of the same bytes measured in the same run.

Two processes each own a KV cache of Llama-3-8B's KV geometry (32 layers, 8 KV heads, head_dim 128, bf16,
16-token blocks: 2 MiB per block) and a NIXL agent. The reader pulls N blocks of the holder's cache:
  - "contiguous": block ids in runs, as the allocator hands out a prompt's blocks (coalesced descriptors);
  - "scattered": a random permutation, one descriptor per block (the worst case).
Each pattern is read both ways a read can be posted (TransferConfig.prepared_descriptors): by block index from
descriptor lists prepared once per peer ("prepared", the default), and from descriptor rows built per read
("per-read").
Baseline: `dst.copy_(src)` of the same number of bytes inside one process (CPU), or GPU 0 -> GPU 1 (--gpu).
--local-copy (CPU): same-host reads copy from the holder's shared KV memory with memcpy instead of going through
UCX (kv_transfer/local_copy.py).

    .venv/bin/python bench/kv_transfer_bandwidth.py --sizes-mb 64 512            # DRAM -> DRAM
    python3 bench/kv_transfer_bandwidth.py --gpu --sizes-mb 64 512               # VRAM -> VRAM, 2 GPUs
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import torch

from engine.kv_cache import KVCache, KVLayout
from kv_transfer.agent import TransferAgent
from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.read_state import ReadStatus

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def make_cache(num_blocks: int, device: str, layer_groups: int = 1) -> KVCache:
    layout = KVLayout(num_blocks=num_blocks, num_kv_heads=KV_HEADS, num_layers=LAYERS, block_size=BLOCK,
                      head_dim=HEAD_DIM, element_size=2, num_layer_groups=layer_groups)
    return KVCache(layout, torch.bfloat16, device)


def make_agent(cache: KVCache, name: str, cfg: TransferConfig) -> TransferAgent:
    return TransferAgent(cache, name, 0, 1, KV_HEADS, "bfloat16", "bench", cfg)


def holder(conn: Any, num_blocks: int, device: str, cfg: TransferConfig, layer_groups: int = 1) -> None:
    torch.set_num_threads(1)
    cache = make_cache(num_blocks, device, layer_groups)
    cache.tensor.normal_()
    agent = make_agent(cache, "holder", cfg)
    conn.send((agent.describe(), cache.block_sums()))
    while not conn.poll(0.001):  # serve the agent (as the prefill worker's loop does) until the reader is done
        agent.receive()
    agent.close()


def timed_read(agent: TransferAgent, remote: AgentDescriptor, local: list[int], src: list[int], iters: int,
               tag: str) -> tuple[float, float, int]:
    """Median seconds of a whole read (post + completion), median seconds of posting it, descriptors."""
    times, posts, descs = [], [], 0
    for i in range(iters + 1):
        xid = f"{tag}-{i}"
        t0 = time.perf_counter()
        err = agent.start_read(xid, [remote], local, src)
        t1 = time.perf_counter()
        assert err is None, err
        while (state := agent.poll([xid])[xid]).status is ReadStatus.IN_FLIGHT:
            pass
        dt = time.perf_counter() - t0
        assert state.status is ReadStatus.DONE, state
        descs = agent.finish(xid).num_descriptors
        if i:  # the first read sets up the connection
            times.append(dt)
            posts.append(t1 - t0)
    return statistics.median(times), statistics.median(posts), descs


LABELS = ("contiguous", "scattered", "contiguous per-read", "scattered per-read")


def patterns(contig: list[int], scattered: list[int]) -> list[tuple[str, list[int], bool]]:
    """(label, source block ids, prepared descriptors?) in LABELS order."""
    return [("contiguous", contig, True), ("scattered", scattered, True), ("contiguous per-read", contig, False),
            ("scattered per-read", scattered, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--gpu", action="store_true", help="VRAM on cuda:0 (holder) and cuda:1 (reader)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--ucx-tls", default=None)
    ap.add_argument("--max-desc-mb", type=int, default=16)
    ap.add_argument("--parallel-handles", type=int, default=None, help="default: 4 on GPU, 1 on CPU")
    ap.add_argument("--num-threads", type=int, default=0, help="UCX worker threads (kv_transfer.num_threads)")
    ap.add_argument("--progress-thread", choices=("on", "off"), default=None,
                    help="NIXL's progress thread (default: on for GPU, off for a CPU driver rank)")
    ap.add_argument("--local-copy", action="store_true", help="same-host reads copied from the holder's "
                    "shared KV memory (kv_transfer.local_copy) instead of UCX")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = TransferConfig(ucx_tls=args.ucx_tls, max_descriptor_bytes=args.max_desc_mb << 20,
                         parallel_handles=args.parallel_handles, num_threads=args.num_threads,
                         local_copy=args.local_copy,
                         progress_thread=None if args.progress_thread is None else args.progress_thread == "on")
    block_bytes = KV_HEADS * LAYERS * 2 * BLOCK * HEAD_DIM * 2
    max_blocks = max(args.sizes_mb) * 2**20 // block_bytes
    dev_h, dev_r = ("cuda:0", "cuda:1") if args.gpu else ("cpu", "cpu")
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=holder, args=(child, 2 * max_blocks, dev_h, cfg))
    proc.start()
    remote, sums = conn.recv()
    cache = make_cache(2 * max_blocks, dev_r)
    agent = make_agent(cache, "reader", cfg)
    results = []
    gen = torch.Generator().manual_seed(0)
    for mb in args.sizes_mb:
        n = mb * 2**20 // block_bytes
        src_ids = torch.randperm(2 * max_blocks, generator=gen)[:n].tolist()
        # Contiguous: the holder's blocks in runs of 16 (a 256-token prompt), the reader's from 0.
        runs = [list(range(s, s + 16)) for s in range(0, 2 * max_blocks, 32)]
        contig_src = [b for r in runs for b in r][:n]
        row: dict[str, Any] = {"size_mb": mb, "blocks": n, "block_bytes": block_bytes}
        for label, src, prepared in patterns(contig_src, src_ids):
            agent.cfg.prepared_descriptors = prepared
            secs, post, descs = timed_read(agent, remote, list(range(n)), src, args.iters, f"{label}{mb}")
            ok = all(abs(cache.block(i).float().sum().item() - sums[s]) < 1e-3 * max(1.0, abs(sums[s]))
                     for i, s in enumerate(src))
            row[label] = {"seconds": secs, "post_seconds": post, "GBps": n * block_bytes / secs / 1e9,
                          "descriptors": descs, "verified": ok}
        nbytes = n * block_bytes
        a = torch.empty(nbytes, dtype=torch.uint8, device=dev_h).random_()
        b = torch.empty(nbytes, dtype=torch.uint8, device=dev_r)
        b.copy_(a)
        times = []
        for _ in range(args.iters):
            if args.gpu:
                torch.cuda.synchronize(dev_h), torch.cuda.synchronize(dev_r)
            t0 = time.perf_counter()
            b.copy_(a)
            if args.gpu:
                torch.cuda.synchronize(dev_r)
            times.append(time.perf_counter() - t0)
        copy = statistics.median(times)
        row["copy"] = {"seconds": copy, "GBps": nbytes / copy / 1e9, "what": "torch copy_ " + (
            "cuda:0 -> cuda:1" if args.gpu else f"({torch.get_num_threads()} threads)")}
        for label in LABELS:
            row[label]["ratio_to_copy"] = copy / row[label]["seconds"]
        if not args.gpu:
            # One plain libc memcpy: the like-for-like baseline for cma, itself one kernel copy per read.
            memmove = ctypes.memmove
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                memmove(b.data_ptr(), a.data_ptr(), nbytes)
                times.append(time.perf_counter() - t0)
            plain = statistics.median(times)
            row["memcpy"] = {"seconds": plain, "GBps": nbytes / plain / 1e9, "what": "libc memcpy, 1 thread"}
            for label in LABELS:
                row[label]["ratio_to_memcpy"] = plain / row[label]["seconds"]
        results.append(row)
        base = f"memcpy {row['memcpy']['GBps']:5.1f} GB/s, " if "memcpy" in row else ""
        mine = {k: row[k].get("ratio_to_memcpy", row[k]["ratio_to_copy"]) for k in LABELS}
        print(f"{mb:5d} MB ({n} x {block_bytes >> 20} MiB blocks): {base}copy {row['copy']['GBps']:6.1f} GB/s",
              flush=True)
        for k in LABELS:
            print(f"    {k:20s} {row[k]['GBps']:6.1f} GB/s = {mine[k]:.2f}x {'memcpy' if base else 'copy'} "
                  f"({row[k]['descriptors']} descs, post {row[k]['post_seconds'] * 1e3:.2f} ms, "
                  f"verified {row[k]['verified']})", flush=True)
    conn.send("done")
    agent.close()
    proc.join(30)
    env = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "gpu" if args.gpu else "cpu", "torch_threads": torch.get_num_threads(),
                       "max_descriptor_mb": args.max_desc_mb, "parallel_handles": args.parallel_handles,
                       "ucx_env": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
