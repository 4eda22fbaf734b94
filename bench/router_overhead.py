"""What one placement decision costs the router, against a real redis-server holding a filled index.

    .venv/bin/python bench/router_overhead.py --instances 64 --json router-overhead.json

Registers I instances (a quarter prefill, the rest decode) with loads, fills the prefix-block index through the
instances' real write path (MetadataStore.apply_kv_events: block sets and event streams) with
`--blocks-per-instance` blocks per decode instance, part of them the blocks of conversation prefixes the
prompts reuse, then measures, in one run:

  - the old path: per decision, the reads the router made before issue 15 (registry, one SMEMBERS per prompt
    block, loads, policy) and place(), as the baseline;
  - cold start: how long a new router's ClusterView takes to read the registry and the whole index;
  - the new path, single-threaded: RouterService.hash_prompt + RouterService.place (memory only), while an
    instance process publishes KV events at `--event-rate` per second, which the view's thread follows;
  - the new path as the router runs it, on an asyncio loop: saturated (`--concurrency` requests waiting), and
    at `--rate` decisions offered per second (Poisson), where latency includes queueing.

`--relay` also measures the streaming relay: `pdserve serve` (small dummy model on CPU) streams greedy tokens to
concurrent clients, and the router process's CPU time gives tokens relayed per CPU-second.

The last line is exactly `router decisions: N/s, p50 X ms, p99 Y ms (instances I, prompt B blocks)`, for the
new path as the router runs it: N saturated, X and Y the latencies at `--rate` offered decisions per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.block_pool import KVEvent  # noqa: E402
from engine.model_info import ModelInfo  # noqa: E402
from metastore import InstanceInfo, Load, MetadataStore, PlacementPolicy, RedisServer  # noqa: E402
from router.cluster_view import ClusterView  # noqa: E402
from router.placement import place  # noqa: E402
from router.service import INLINE_PROMPT_TOKENS, RouterService  # noqa: E402

BLOCK = 16
INFO = ModelInfo(model="bench", vocab_size=128_256, max_model_len=32_768, block_size=BLOCK, hash_salt="bench",
                 eos_token_ids=(2,), dtype="bfloat16")
POLICY = PlacementPolicy(max_local_prefill_tokens=256)


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "mean_ms": statistics.fmean(ordered) * 1e3}


class Cluster:
    """I registered instances with loads and a filled index, in a real redis-server."""

    def __init__(self, store: MetadataStore, args: argparse.Namespace) -> None:
        self.store, self.args = store, args
        rng = random.Random(args.seed)
        n_prefill = args.instances // 4
        self.ids = [f"prefill-{i}" for i in range(n_prefill)] + [f"decode-{i}" for i in range(args.instances -
                                                                                               n_prefill)]
        self.decodes = [i for i in self.ids if i.startswith("decode")]
        prompt_blocks = args.prompt_tokens // BLOCK
        # Conversations: a system prompt shared by all, then their own turns; each lives on 1 to 3 instances.
        system = [rng.randrange(3, INFO.vocab_size) for _ in range(4 * BLOCK)]
        self.conversations = [system + [rng.randrange(3, INFO.vocab_size) for _ in range(
            rng.randrange(prompt_blocks // 4, prompt_blocks) * BLOCK - len(system))] for _ in range(args.conversations)]
        t0 = time.monotonic()
        for iid in self.ids:
            role = "prefill" if iid.startswith("prefill") else "decode"
            store.register(InstanceInfo(iid, role, iid, 1, BLOCK, 200_000, 256, model="bench", pid=1))
            store.heartbeat(iid, Load(waiting=rng.randrange(4), running=rng.randrange(64), kv_usage=rng.random()))
        held: dict[str, list[int]] = {iid: [] for iid in self.decodes}
        for c in self.conversations:
            hashes = RouterService.hash_prompt_of(INFO, c)
            for iid in rng.sample(self.decodes, rng.randrange(1, 4)):
                held[iid] += hashes
        for n, iid in enumerate(self.decodes):
            blocks = held[iid] + [rng.getrandbits(128) for _ in range(max(0, args.blocks_per_instance -
                                                                          len(held[iid])))]
            store.apply_kv_events(iid, [KVEvent("stored", tuple(blocks))])
            print(f"\rfilling the index: {n + 1}/{len(self.decodes)} decode instances", end="", file=sys.stderr)
        print(f"\rfilled the index: {len(self.decodes)} x {args.blocks_per_instance} blocks in "
              f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
        self.rng = rng

    def prompt(self) -> list[int]:
        """A prompt of exactly --prompt-tokens tokens: 3 in 4 continue a conversation, 1 in 4 are new."""
        n = self.args.prompt_tokens
        head = self.rng.choice(self.conversations) if self.rng.random() < 0.75 else []
        return (head + [self.rng.randrange(3, INFO.vocab_size) for _ in range(n)])[:n]


def publish_forever(url: str, instance_id: str, rate: float, seed: int) -> None:
    """A busy decode instance's KV events, `rate` per second, from its own process (as in a real cluster)."""
    store, rng = MetadataStore(url, "bench", registry_lease_s=3600), random.Random(seed)
    while True:
        fresh = tuple(rng.getrandbits(128) for _ in range(8))
        store.apply_kv_events(instance_id, [KVEvent("stored", fresh), KVEvent("removed", fresh[:4])])
        time.sleep(1.0 / rate)


def old_path(cluster: Cluster, n: int) -> dict[str, float]:
    """The pre-issue-15 decision: read Redis (registry, overlap per block, loads, policy), then place()."""
    store, samples = cluster.store, []
    for _ in range(n):
        tokens = cluster.prompt()
        t0 = time.perf_counter()
        hashes = RouterService.hash_prompt_of(INFO, tokens)
        instances = store.live_instances()
        overlaps = store.prefix_overlap(hashes)
        loads = store.loads([i.instance_id for i in instances])
        policy = store.policy(POLICY)
        place(len(tokens), [i for i in instances if i.role == "decode"], [i for i in instances if
              i.role == "prefill"], overlaps, loads, policy, {}, hashes[0], {})
        samples.append(time.perf_counter() - t0)
    return {"decisions_per_s": n / sum(samples), **percentiles(samples)}


def single_threaded(svc: RouterService, cluster: Cluster, n: int, window: int) -> dict[str, float]:
    samples, placed = [], []
    for k in range(n):
        tokens, rid = cluster.prompt(), f"s{k}"
        svc.inflight[rid] = None
        t0 = time.perf_counter()
        svc.place(rid, tokens, hashes=svc.hash_prompt(tokens))
        samples.append(time.perf_counter() - t0)
        placed.append(rid)
        if len(placed) > window:  # requests finish: `window` stay in flight, as in a busy router
            svc._release(placed.pop(0))
    for rid in placed:
        svc._release(rid)
    return {"decisions_per_s": n / sum(samples), **percentiles(samples)}


def as_the_router_runs_it(svc: RouterService, cluster: Cluster, n: int, concurrency: int,
                          rate: float) -> dict[str, float]:
    """RouterService.Generate's decision: hash (on the event loop up to INLINE_PROMPT_TOKENS, else on a worker
    thread), then place on the event loop.
    Saturated: `concurrency` requests always waiting, decisions/s = n / wall time. Offered: requests arrive at
    `rate` per second (Poisson) and each decision's latency, from arrival to placed, includes any queueing."""
    prompts = [cluster.prompt() for _ in range(n)]

    async def decide(k: int, samples: list[float]) -> str:
        rid = f"c{k}"
        svc.inflight[rid] = None
        t0 = time.perf_counter()
        tokens = prompts[k]
        if len(tokens) <= INLINE_PROMPT_TOKENS:
            hashes = svc.hash_prompt(tokens)
        else:
            hashes = await asyncio.to_thread(svc.hash_prompt, tokens)
        svc.place(rid, tokens, hashes=hashes)
        samples.append(time.perf_counter() - t0)
        return rid

    async def saturated() -> tuple[float, list[float]]:
        samples: list[float] = []
        todo = iter(range(n))

        async def worker() -> None:
            for k in todo:
                svc._release(await decide(k, samples))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, samples

    async def offered() -> list[float]:
        samples: list[float] = []
        rng, tasks = random.Random(1), []

        async def one(k: int) -> None:
            rid = await decide(k, samples)
            await asyncio.sleep(0.1)  # the request runs a while, then frees its slot
            svc._release(rid)

        next_at = time.perf_counter()
        for k in range(n):
            next_at += rng.expovariate(rate)
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(k)))
        await asyncio.gather(*tasks)
        return samples

    wall, _ = asyncio.run(saturated())
    at_rate = percentiles(asyncio.run(offered()))
    return {"decisions_per_s": n / wall, "concurrency": concurrency, "offered_rate": rate, **at_rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--blocks-per-instance", type=int, default=100_000)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--conversations", type=int, default=500)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--old-decisions", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32, help="requests waiting at once, saturated")
    ap.add_argument("--rate", type=float, default=2000.0, help="offered decisions/s for the latency figures")
    ap.add_argument("--event-rate", type=float, default=200.0, help="KV events/s published during the run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--relay", action="store_true", help="also measure the streaming relay (starts pdserve)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.instances < 2 or args.prompt_tokens < BLOCK:
        ap.error("--instances must be >= 2 and --prompt-tokens >= one block")
    results: dict[str, object] = {"args": vars(args) | {"json": str(args.json)}}
    with RedisServer() as redis:
        store = MetadataStore(redis.url, "bench", registry_lease_s=3600)
        cluster = Cluster(store, args)
        results["old_path"] = old = old_path(cluster, args.old_decisions)
        print(f"old path (Redis reads per decision): {old['decisions_per_s']:.0f}/s, p50 {old['p50_ms']:.2f} ms, "
              f"p99 {old['p99_ms']:.2f} ms", file=sys.stderr)
        t0 = time.monotonic()
        view = ClusterView(MetadataStore(redis.url, "bench", socket_timeout=10), POLICY).start()
        results["cold_start_s"] = cold = time.monotonic() - t0
        print(f"cold start: the registry and {args.blocks_per_instance * len(cluster.decodes):,} blocks reached a "
              f"new router in {cold:.2f} s", file=sys.stderr)
        publisher = multiprocessing.get_context("spawn").Process(
            target=publish_forever, args=(redis.url, cluster.decodes[0], args.event_rate, args.seed), daemon=True)
        publisher.start()
        try:
            svc = RouterService(INFO, None, view, "bench", max_inflight=1 << 30)
            single_threaded(svc, cluster, 200, 256)  # warm up
            results["single_threaded"] = one = single_threaded(svc, cluster, args.decisions, 256)
            print(f"new path, single-threaded: {one['decisions_per_s']:.0f}/s, p50 {one['p50_ms']:.3f} ms, "
                  f"p99 {one['p99_ms']:.3f} ms", file=sys.stderr)
            results["router"] = run = as_the_router_runs_it(svc, cluster, args.decisions, args.concurrency, args.rate)
            results["view_counters"] = dict(view.counters)
        finally:
            publisher.kill()
            publisher.join(5)
            view.close()
    if args.relay:
        from bench.router_relay import measure_relay

        results["relay"] = measure_relay()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    speedup = run["decisions_per_s"] / old["decisions_per_s"]
    print(f"new path vs old: {speedup:.1f}x the decisions/s", file=sys.stderr)
    print(f"router decisions: {run['decisions_per_s']:.0f}/s, p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.3f} ms "
          f"(instances {args.instances}, prompt {args.prompt_tokens // BLOCK} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
