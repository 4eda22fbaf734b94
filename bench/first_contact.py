"""What a fresh 1P+1D cluster's first disaggregated requests cost against its later ones: the one-time set-up on
the path of the first request between a prefill and a decode instance (a NIXL agent, a peer's metadata, a UCX
connection), on the tiny CPU cluster.

    .venv/bin/python bench/first_contact.py [--clusters 3] [--requests 8] [--json OUT]

Each cluster is a fresh `pdserve serve` of bench/small_cluster.py's model (1 prefill + 1 decode instance);
`pdserve bench` sends it `--requests` prompts of 64 tokens (over the placement's 32-token local limit: all
prefilled remotely, KV streamed layer-wise) at 1 req/s, so they rarely overlap; the report gives each cluster's
first TTFT and the median of the rest, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from small_cluster import small_cluster  # bench/, the script's folder


def one_cluster(requests: int, seed: int) -> list[float]:
    """TTFTs (s) in send order of `requests` disaggregated requests to a fresh cluster."""
    with small_cluster(max_num_seqs=16) as (ready, _), tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--target", ready.targets[0], "--rate", "1",
                        "--num-requests", str(requests), "--input-len", "fixed:64", "--output-len", "fixed:8",
                        "--seed", str(seed), "--out", out, "--no-progress"], check=True, capture_output=True,
                       timeout=60 + 5 * requests)
        rows = json.loads((Path(out) / "results.json").read_text())["runs"][0]["requests"]
    if not all(r["disaggregated"] for r in rows):
        raise SystemExit("a request was prefilled locally: the comparison needs every one disaggregated")
    return [r["ttft_s"] for r in sorted(rows, key=lambda r: r["sent_s"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=3, help="fresh clusters, one after another")
    ap.add_argument("--requests", type=int, default=8, help="per cluster (at least 3)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.requests < 3:
        raise SystemExit("--requests must be at least 3")
    runs = []
    for i in range(args.clusters):
        ttft = one_cluster(args.requests, seed=1 + i)
        rest = statistics.median(ttft[1:])
        runs.append({"ttft_s": ttft, "first_s": ttft[0], "rest_median_s": rest})
        print(f"cluster {i + 1}: first request {1e3 * ttft[0]:.0f} ms, the rest {1e3 * rest:.0f} ms median "
              f"({ttft[0] / rest:.2f}x); all: {', '.join(f'{1e3 * t:.0f}' for t in ttft)} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
