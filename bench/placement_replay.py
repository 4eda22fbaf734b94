"""Prefix-cache hit rate of the router's placement on a replayed request trace, against one shared cache.

    .venv/bin/python bench/placement_replay.py --trace ../shared/workloads/mooncake_synthetic_trace.jsonl

Replays a Mooncake-format trace through the router's real decision (RouterService.place, its in-memory
PrefixIndex and shared-prefix tracker) over `--instances` decode instances, with a simple service model: a
request occupies its instance from its arrival for `--tpot-ms` per output token plus `--prefill-us` per
uncached prompt token, and the router's own in-flight count is the load (`max_num_seqs` 16). Caches are
unbounded; an instance holds a prompt's blocks from the moment it is placed there. Each trace block becomes 16
tokens (one engine block). `--system-blocks N` puts the same N blocks in front of every prompt (a system
prompt every request shares).

Prints the hit rate (cached prompt tokens / prompt tokens) of: one shared cache (the ideal), placement with the
shared-prefix rule, placement without it (`shared_prefix_fanout` 0), and round-robin; and how evenly each spread
the requests.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.model_info import ModelInfo  # noqa: E402
from metastore import InstanceInfo, InstanceStatsRecord, PlacementPolicy  # noqa: E402
from metastore.nodes import NodeRecord  # noqa: E402
from metastore.store import IndexSnapshot, Load, block_key  # noqa: E402
from pdserve.bench import workload  # noqa: E402
from router.cluster_view import ClusterView  # noqa: E402
from router.placement import cached_tokens  # noqa: E402
from router.prefix_index import PrefixIndex  # noqa: E402
from router.service import RouterService  # noqa: E402

BLOCK = 16
INFO = ModelInfo(model="replay", vocab_size=32_000, max_model_len=1 << 20, block_size=BLOCK, hash_salt="replay",
                 eos_token_ids=(2,), dtype="bfloat16")


@dataclass(frozen=True)
class ReplayResult:
    hit_rate: float
    busiest_share: float  # the largest fraction of requests one instance served
    instances_used: int


class _Registry:
    """The cluster view's reads, answered without Redis (the simulated pool has no instances to run)."""

    def __init__(self, n: int) -> None:
        self.instances = [InstanceInfo(f"decode-{i}", "decode", f"decode-{i}", 1, BLOCK, 1 << 20, 16)
                          for i in range(n)]

    def live_instances(self, role: str | None = None) -> list[InstanceInfo]:
        return list(self.instances)

    def loads(self, ids: list[str]) -> dict[str, Load]:
        return {i: Load() for i in ids}

    def instance_stats(self, ids: list[str]) -> dict[str, InstanceStatsRecord]:
        return {}  # no instance runs: no stats records

    def policy(self, base: PlacementPolicy | None = None) -> PlacementPolicy:
        return base or PlacementPolicy()

    def index_snapshot(self, instance_id: str) -> IndexSnapshot:
        return IndexSnapshot("0-0", 0, [])

    def nodes(self) -> tuple[NodeRecord, ...]:
        return ()  # no Ray nodes either


def requests(trace: Path, num: int, system_blocks: int) -> list[workload.BenchRequest]:
    rows = workload.mooncake_trace(trace, num, INFO.vocab_size, tokens_per_block=BLOCK)
    system = workload.block_tokens(-10**9, system_blocks * BLOCK, INFO.vocab_size) if system_blocks else []
    return [workload.BenchRequest(r.index, r.arrival_s, system + r.tokens, r.max_tokens, r.hash_ids) for r in rows]


def replay(reqs: list[workload.BenchRequest], instances: int, fanout: int | None, tpot_ms: float = 20.0,
           prefill_us: float = 50.0) -> ReplayResult:
    """fanout None: round-robin; else RouterService.place with that shared_prefix_fanout."""
    policy = PlacementPolicy(max_local_prefill_tokens=1 << 30, shared_prefix_fanout=fanout or 0)
    view = ClusterView(_Registry(instances), policy)  # type: ignore[arg-type]
    view.refresh()
    svc = RouterService(INFO, None, view, "replay", max_inflight=1 << 30)
    running: list[tuple[float, str]] = []  # (finish time, request id)
    cached = total = 0
    served: Counter[str] = Counter()
    for k, req in enumerate(reqs):
        while running and running[0][0] <= req.arrival_s:
            svc._release(heapq.heappop(running)[1])
        rid, hashes = f"r{k}", svc.hash_prompt(req.tokens)
        if fanout is None:
            where = f"decode-{k % instances}"
            hit = cached_tokens(view.index.overlap(hashes).get(where, 0), BLOCK, len(req.tokens))
        else:
            svc.inflight[rid] = None
            placement = svc.place(rid, req.tokens, hashes=hashes)
            where, hit = placement.decode_instance, placement.cached_tokens
        view.index.store(where, [block_key(h) for h in hashes])
        served[where] += 1
        cached, total = cached + hit, total + len(req.tokens)
        busy_s = req.max_tokens * tpot_ms / 1e3 + (len(req.tokens) - hit) * prefill_us / 1e6
        heapq.heappush(running, (req.arrival_s + busy_s, rid))
    return ReplayResult(cached / total, max(served.values()) / len(reqs), len(served))


def ideal(reqs: list[workload.BenchRequest]) -> float:
    """One cache holding every prompt's blocks."""
    index, cached, total = PrefixIndex(), 0, 0
    for req in reqs:
        hashes = RouterService.hash_prompt_of(INFO, req.tokens)
        cached += cached_tokens(index.overlap(hashes).get("all", 0), BLOCK, len(req.tokens))
        total += len(req.tokens)
        index.store("all", [block_key(h) for h in hashes])
    return cached / total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--num-requests", type=int, default=3000)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--system-blocks", type=int, default=0)
    args = ap.parse_args()
    reqs = requests(args.trace, args.num_requests, args.system_blocks)
    best = ideal(reqs)
    print(f"{len(reqs)} requests, {args.instances} decode instances, {args.system_blocks} shared system blocks")
    print(f"one shared cache (ideal): hit rate {best:.4f}")
    for name, fanout in (("placement", 2), ("placement without the shared-prefix rule", 0), ("round-robin", None)):
        r = replay(reqs, args.instances, fanout)
        print(f"{name}: hit rate {r.hit_rate:.4f} ({r.hit_rate / best:.3f} of ideal), busiest instance "
              f"{r.busiest_share:.2f} of requests, {r.instances_used} instances used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
