"""The streaming relay: how many generated tokens one router process passes from decode actors to clients per
CPU-second it spends.

`pdserve serve` (one decode instance of the small dummy-weights model on CPU, no prefill pool) serves `streams`
greedy streams at once; the clients count the tokens they receive, and the router process's CPU time (user +
system, from /proc) over the same interval gives tokens per router CPU-second: the rate one router core could
relay if the decode pool were fast enough to feed it. On this 2-core machine the decode instance, not the
router, limits the absolute rate.

    .venv/bin/python bench/router_overhead.py --relay ...   (or call measure_relay())
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.v1 import pdserve_pb2 as pb  # noqa: E402
from api.v1 import pdserve_pb2_grpc as pb_grpc  # noqa: E402
from bench.small_cluster import small_cluster  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure_relay(streams: int = 32, max_tokens: int = 256) -> dict[str, float]:
    pools = {"prefill": {"replicas": 0}, "decode": {"replicas": 1}}
    with small_cluster(streams, pools, {"max_inflight": streams * 2}) as (ready, pid):
        return _relay(ready.targets[0], pid, streams, max_tokens)


def _relay(target: str, router_pid: int, streams: int, max_tokens: int) -> dict[str, float]:
    received = [0] * streams
    messages = [0] * streams
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PDServeStub(channel)

        def one(i: int) -> None:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3 + (i * 7 + t) % 4000 for t in range(32)]),
                                         sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                    ignore_eos=True))
            for msg in stub.Generate(request, timeout=600):
                received[i] += len(msg.token_ids)
                messages[i] += 1

        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingParams(
            max_tokens=4)), timeout=120))  # warm up
        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        cpu0, t0 = cpu_seconds(router_pid), time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        cpu, wall = cpu_seconds(router_pid) - cpu0, time.monotonic() - t0
    tokens = sum(received)
    return {"streams": streams, "tokens": tokens, "messages": sum(messages), "wall_s": wall,
            "router_cpu_s": cpu, "tokens_per_s": tokens / wall, "tokens_per_router_cpu_s": tokens / max(cpu, 1e-9),
            "router_cpu_share": cpu / wall}


if __name__ == "__main__":
    print(measure_relay())
