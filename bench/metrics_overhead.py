"""Does observing the cluster slow it down? Decode throughput of the tiny CPU cluster (`pdserve serve`, 1 prefill
+ 1 decode instance of the small dummy-weights model) with a Prometheus scrape of the router's /metrics and a
`pdserve status` (GetLoads, rendered) every second, against the same load with neither, measured in the same run.

Phases alternate (off, on, off, on, ...) so that drift on a shared machine falls on both; each phase runs
`streams` greedy streams of `max_tokens` tokens (prompts of 16 and 48 tokens: half prefilled locally, half on
the prefill instance). The result is the ratio of mean tokens/s with observation to mean tokens/s without.

    .venv/bin/python bench/metrics_overhead.py [--rounds 3] [--streams 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.v1 import pdserve_pb2 as pb  # noqa: E402
from api.v1 import pdserve_pb2_grpc as pb_grpc  # noqa: E402
from bench.small_cluster import small_cluster  # noqa: E402
from pdserve.status import render  # noqa: E402


class Observer:
    """Scrapes /metrics and renders `pdserve status` once a second until stopped."""

    def __init__(self, stub: pb_grpc.PDServeStub, metrics_url: str) -> None:
        self.stub, self.url = stub, metrics_url
        self.scrapes, self.scrape_s = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as response:
                response.read()
            render(self.stub.GetLoads(pb.GetLoadsRequest(), timeout=10), io.StringIO())
            self.scrapes += 1
            self.scrape_s += time.perf_counter() - t0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def phase(stub: pb_grpc.PDServeStub, streams: int, max_tokens: int, seed: int) -> float:
    """Generated tokens per second of `streams` concurrent streams."""
    received = [0] * streams

    def one(i: int) -> None:
        n = 16 if i % 2 else 48
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3 + (seed * 131 + i * 7 + t) % 4000
                                                                for t in range(n)]),
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                ignore_eos=True))
        for msg in stub.Generate(request, timeout=600):
            received[i] += len(msg.token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return sum(received) / (time.monotonic() - t0)


def measure(rounds: int, streams: int, max_tokens: int) -> dict[str, object]:
    with small_cluster(max_num_seqs=streams) as (ready, _), grpc.insecure_channel(ready.targets[0]) as channel:
        stub = pb_grpc.PDServeStub(channel)
        phase(stub, 4, 8, seed=999)  # warm-up (compiles, fills nothing that matters): not reported
        off: list[float] = []
        on: list[float] = []
        scrapes, scrape_s = 0, 0.0
        for r in range(rounds):
            off.append(phase(stub, streams, max_tokens, seed=2 * r))
            observer = Observer(stub, ready.metrics_urls[0])
            on.append(phase(stub, streams, max_tokens, seed=2 * r + 1))
            observer.stop()
            scrapes, scrape_s = scrapes + observer.scrapes, scrape_s + observer.scrape_s
            print(f"round {r}: {off[-1]:.1f} tok/s without, {on[-1]:.1f} tok/s with observation",
                  file=sys.stderr, flush=True)
    return {"rounds": rounds, "streams": streams, "max_tokens": max_tokens, "tokens_per_s_off": off,
            "tokens_per_s_on": on, "ratio_on_to_off": statistics.mean(on) / statistics.mean(off),
            "pair_ratios": [b / a for a, b in zip(off, on, strict=True)],
            "median_pair_ratio": statistics.median(b / a for a, b in zip(off, on, strict=True)), "scrapes": scrapes,
            "mean_scrape_and_status_ms": 1e3 * scrape_s / max(scrapes, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    a = parser.parse_args()
    print(json.dumps(measure(a.rounds, a.streams, a.max_tokens), indent=1))
