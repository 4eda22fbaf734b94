"""bench/router_overhead.py at a small size: it fills a real redis-server, runs both paths and ends with the
documented line (the figures themselves are in docs/performance.md, from the full-size run)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_small_run_ends_with_the_documented_line(tmp_path: pathlib.Path) -> None:
    out = subprocess.run([sys.executable, "bench/router_overhead.py", "--instances", "8", "--blocks-per-instance",
                          "3000", "--conversations", "20", "--decisions", "300", "--old-decisions", "30",
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=180,
                         cwd=ROOT, check=True)
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"router decisions: \d+/s, p50 [\d.]+ ms, p99 [\d.]+ ms \(instances 8, prompt 128 blocks\)",
                        last), last
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) >= {"old_path", "cold_start_s", "single_threaded", "router", "view_counters"}
    assert data["view_counters"].get("index_resyncs", 0) == 0  # the view followed the publisher's stream
