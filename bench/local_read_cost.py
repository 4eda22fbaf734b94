"""Where a same-host GPU read's time goes (kv_transfer.local_copy on two GPUs): host time of each step of
`TransferAgent.start_read` (for a gather: its upload, launch and event too), the copy's own GPU time (CUDA events
around it on the read's stream), and the same for a plain cuda:0 -> cuda:1 `copy_` of the same bytes in the same
run.

    python3 bench/local_read_cost.py --sizes-mb 64 512 --iters 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.kv_transfer_bandwidth import holder, make_agent, make_cache
from kv_transfer import gather_kernel, gpu_copy
from kv_transfer.config import TransferConfig
from kv_transfer.gpu_copy import block_runs
from kv_transfer.read_state import ReadStatus


def host_us(fn: Callable[[], Any], iters: int, sync: bool = False) -> float:
    """Median host microseconds of fn() (`sync`: with the GPUs idle before each call)."""
    out = []
    for _ in range(iters):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return statistics.median(out) / 1e3


def gpu_us(stream: Any, fn: Callable[[], Any], iters: int) -> tuple[float, float]:
    """Median (GPU microseconds between events around fn() on `stream`, host microseconds to its end)."""
    gpu, wall = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter_ns()
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        wall.append(time.perf_counter_ns() - t0)
        gpu.append(a.elapsed_time(b) * 1e3)
    return statistics.median(gpu), statistics.median(wall) / 1e3


def measure(agent: Any, remote: Any, dst: list[int], src: list[int], iters: int) -> dict[str, Any]:
    """One read pattern: whole reads, their posting, cutting them into runs, the copy's launch and its GPU time,
    and the baseline copy of the same bytes."""
    err = agent.start_read("warm", [remote], dst, src)  # maps the peer, compiles the gather
    assert err is None
    while agent.poll(["warm"])["warm"].status is ReadStatus.IN_FLIGHT:
        pass
    agent.finish("warm")
    peer = agent.local_peers.direct[remote.agent_name]  # the first read made it direct
    groups = agent.all_groups
    k = [0]

    def read() -> None:
        k[0] += 1
        xid = f"r{k[0]}"
        agent.start_read(xid, [remote], dst, src)
        while agent.poll([xid])[xid].status is ReadStatus.IN_FLIGHT:
            pass
        agent.finish(xid)

    row: dict[str, Any] = {"runs": len(block_runs(dst, src)) * len(groups), "read_us": host_us(read, iters),
                           "runs_us": host_us(lambda: block_runs(dst, src), iters)}
    launches, posts = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        done = peer.read_units(dst, src, groups)
        launches.append(time.perf_counter_ns() - t0)
        done.events[0].synchronize()
        k[0] += 1
        t0 = time.perf_counter_ns()
        agent.start_read(f"p{k[0]}", [remote], dst, src)
        posts.append(time.perf_counter_ns() - t0)
        torch.cuda.synchronize()
        agent.finish(f"p{k[0]}")
    row["launch_us"], row["post_us"] = statistics.median(launches) / 1e3, statistics.median(posts) / 1e3
    if gpu_copy.gathers(row["runs"]):  # the gather alone (its index upload, launch and event)
        unit, nl, nr = peer.local.block_bytes, peer.local.num_blocks, peer.remote.num_blocks
        launches = []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            done = gpu_copy.gather_units(peer.stream, peer.local_bytes, peer.memory, unit, dst, src, groups, nl, nr,
                                         peer.index_slots)
            launches.append(time.perf_counter_ns() - t0)
            done.event.synchronize()
        row["gather_launch_us"] = statistics.median(launches) / 1e3
        # its pieces: the block lists' upload, the kernel's launch, the end event (kv_transfer/gather_kernel.py)
        drv, stream = gpu_copy.driver(), peer.stream
        kernel = gather_kernel.kernel_for(peer.device_index)
        d, s = peer.local_bytes.data_ptr(), peer.memory.data_ptr()
        if drv is not None and kernel is not None:
            _, lp, rp = peer.index_slots.upload(drv, stream, dst, src)
            row["upload_us"] = host_us(lambda: peer.index_slots.upload(drv, stream, dst, src), iters, sync=True)
            row["kernel_launch_us"] = host_us(lambda: kernel.launch(
                stream.cuda_stream, gpu_copy._word(unit, d, s), d, s, lp, rp, len(dst), groups, nl, nr, unit),
                iters, sync=True)
            row["event_us"] = host_us(lambda: gpu_copy.CopyEvent(drv, stream.cuda_stream), iters, sync=True)
    row["copy_gpu_us"], row["copy_wall_us"] = gpu_us(peer.stream, lambda: peer.read_units(dst, src, groups), iters)
    nbytes = len(dst) * len(groups) * peer.local.block_bytes
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0").random_()
    b = torch.empty(nbytes, dtype=torch.uint8, device=peer.local_bytes.device)
    s = torch.cuda.current_stream(b.device)
    row["base_gpu_us"], row["base_wall_us"] = gpu_us(s, lambda: b.copy_(a), iters)
    row["ratio_read"] = row["base_wall_us"] / row["read_us"]
    row["ratio_gpu"] = row["base_gpu_us"] / row["copy_gpu_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--layer-groups", type=int, default=1, help="KV layout's layer groups (a unit: 2 MiB / G)")
    ap.add_argument("--gather-above-runs", type=int, default=gpu_copy.GATHER_ABOVE_RUNS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gpu_copy.GATHER_ABOVE_RUNS = args.gather_above_runs
    cfg = TransferConfig(local_copy=True)
    block_bytes = 2 * 2**20
    max_blocks = max(args.sizes_mb) * 2**20 // block_bytes
    conn, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=holder, args=(child, 2 * max_blocks, "cuda:0", cfg,
                                                                         args.layer_groups))
    proc.start()
    remote, _ = conn.recv()
    cache = make_cache(2 * max_blocks, "cuda:1", args.layer_groups)
    agent = make_agent(cache, "reader", cfg)
    torch.cuda.set_device(torch.device("cuda:1"))
    rows = []
    for mb in args.sizes_mb:
        n = mb * 2**20 // block_bytes
        contig = [b for s in range(0, 2 * max_blocks, 32) for b in range(s, s + 16)][:n]
        scattered = torch.randperm(2 * max_blocks, generator=torch.Generator().manual_seed(0))[:n].tolist()
        for label, src in (("contiguous", contig), ("scattered", scattered)):
            row = measure(agent, remote, list(range(n)), src, args.iters)
            row = {"size_mb": mb, "pattern": label, "layer_groups": args.layer_groups,
                   "gather_above_runs": args.gather_above_runs, **row}
            rows.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    conn.send("done")
    agent.close()
    proc.join(30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
