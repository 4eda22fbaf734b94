"""The trace replay of placement (bench/placement_replay.py): over 4 decode instances, the router's decisions keep
the prefix-cache hit rate of one shared cache, with and without a system block every prompt shares, far above
round-robin, and spread the requests."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from bench.placement_replay import ideal, replay, requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
_SHARED = ROOT.parent / "shared" / "workloads" / "mooncake_synthetic_trace.jsonl"
# The public trace beside the checkout when present (as in CI), else its first 200 lines kept in tests/data.
TRACE, NUM = (_SHARED, 3000) if _SHARED.exists() else (ROOT / "tests" / "data" / "mooncake_trace_first200.jsonl", 200)


@pytest.mark.parametrize("system_blocks", [0, 1])
def test_placement_keeps_the_hit_rate_of_one_shared_cache(system_blocks: int) -> None:
    reqs = requests(TRACE, NUM, system_blocks)
    best = ideal(reqs)
    placed, round_robin = replay(reqs, 4, fanout=8), replay(reqs, 4, fanout=None)
    assert placed.hit_rate >= 0.99 * best, (placed, best)
    assert placed.hit_rate >= 1.5 * round_robin.hit_rate, (placed, round_robin)
    assert placed.instances_used == 4 and placed.busiest_share <= 0.4, placed


def test_the_command_prints_every_policy() -> None:
    out = subprocess.run([sys.executable, "bench/placement_replay.py", "--trace", str(TRACE), "--num-requests",
                          "100", "--system-blocks", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=True).stdout
    assert "one shared cache (ideal)" in out and "round-robin: hit rate" in out and out.count("of ideal") == 3
