"""Client CPU of publishing KV events to the prefix-block index, against the per-command pipeline it replaced.

    python bench/kv_index_publish.py [--redis-url redis://127.0.0.1:6379/0] [--blocks 188] [--events 300]

A decode instance stores every transferred prompt's blocks (188 blocks of 16 tokens for a 3,000-token prompt)
and publishes them from its engine-loop thread after the step. The baseline, measured in the same run, is the
earlier implementation: two SADD commands per block packed into one pipeline. Without --redis-url a private
redis-server is started.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from engine import KVEvent
from metastore import MetadataStore
from metastore.redis_server import RedisServer


def per_command_pipeline(store: MetadataStore, instance_id: str, events: list[KVEvent]) -> None:
    pipe = store.r.pipeline(transaction=False)
    iblk = store._k("iblk", instance_id)
    for event in events:
        for block_hash in event.block_hashes:
            h = store._h(block_hash)
            pipe.sadd(store._k("blk", h), instance_id)
            pipe.sadd(iblk, h)
    pipe.execute()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url")
    ap.add_argument("--blocks", type=int, default=188)
    ap.add_argument("--events", type=int, default=300)
    args = ap.parse_args()
    server = None if args.redis_url else RedisServer().start()
    store = MetadataStore(args.redis_url or server.url, namespace=f"bench{random.getrandbits(32):x}")
    rng = random.Random(0)
    batches = [[KVEvent("stored", tuple(rng.getrandbits(127) for _ in range(args.blocks)))]
               for _ in range(args.events)]
    res: dict[str, float] = {}
    try:
        for rep in range(2):  # the second round is the one reported (connections and script cache warm)
            for name, fn in (("per_command_pipeline", per_command_pipeline), ("script", None)):
                cpu, wall = time.process_time(), time.perf_counter()
                for i, events in enumerate(batches):
                    iid = f"{name}-{rep}-{i % 4}"
                    if fn is None:
                        store.apply_kv_events(iid, events)
                    else:
                        fn(store, iid, events)
                res[f"{name}_cpu_ms"] = (time.process_time() - cpu) / len(batches) * 1e3
                res[f"{name}_wall_ms"] = (time.perf_counter() - wall) / len(batches) * 1e3
        res["cpu_ratio"] = res["per_command_pipeline_cpu_ms"] / res["script_cpu_ms"]
        print(json.dumps({"blocks_per_event": args.blocks, **{k: round(v, 3) for k, v in res.items()}}, indent=1))
    finally:
        store.r.flushdb()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
