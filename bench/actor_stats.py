"""Print every pdserve actor's stats() as JSON, from the Ray cluster a running `pdserve serve` started.

    python3 bench/actor_stats.py [--address auto] > OUT/actor_stats.json

Used by bench/disagg_vs_aggregated.sh after a sweep: each actor's InstanceStats (instance/worker.py): engine
stats and metrics (step timings, fallbacks), the KV connector's counters (transfers, fallbacks, leases), and
the decode actors' stream counters (engine outputs against stream items: how much merging happened).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import ray


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="auto")
    p.add_argument("--timeout-s", type=float, default=10.0)
    args = p.parse_args()
    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    out: dict[str, object] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if not entry["namespace"].startswith("pdserve-"):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            stats = ray.get(actor.stats.remote(), timeout=args.timeout_s)  # instance.worker.InstanceStats
            out[entry["name"]] = dataclasses.asdict(stats)
        except Exception as e:  # an actor that died or hangs: say so, keep the others
            out[entry["name"]] = {"error": repr(e)}
            print(f"actor_stats: {entry['name']}: {e!r}", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
