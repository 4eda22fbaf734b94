"""What a fresh 1P+1D cluster's first disaggregated requests cost against its later ones: the one-time set-up on
the path of the first request between a prefill and a decode instance (a NIXL agent, a peer's metadata, a UCX
connection), on the tiny CPU cluster.

    .venv/bin/python bench/first_contact.py [--clusters 3] [--requests 8] [--gpu [--shape llama3-8b]] [--json OUT]

Each cluster is a fresh `pdserve serve` of bench/small_cluster.py's model (1 prefill + 1 decode instance);
`pdserve bench` sends it `--requests` prompts of 64 tokens (over the placement's 32-token local limit: all
prefilled remotely, KV streamed layer-wise) at 1 req/s, so they rarely overlap; the report gives each cluster's
first TTFT and the median of the rest, and their ratio. With `--gpu` both instances run on CUDA, sharing one GPU
(`pools.*.gpus_per_instance: 0.5`), and the KV moves by local copy (a CUDA IPC mapping of the peer's cache);
`--shape llama3-8b` serves that dummy model in bf16 (`--input-len` sets the prompts' length).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from small_cluster import small_cluster  # bench/, the script's folder

from pdserve.config import merge_mappings

# both instances on the one GPU, each with a fixed KV size (sharing a GPU needs one: docs/configuration.md)
ON_GPU = {"engine": {"device": "cuda", "kv_cache_memory_bytes": 1 << 30},
          "pools": {"prefill": {"gpus_per_instance": 0.5}, "decode": {"gpus_per_instance": 0.5}}}


# a real-sized model: bf16 and its context length (the tiny YAML's float32 and 1,024 positions are for tests)
LARGE = {"engine": {"dtype": "bfloat16", "max_model_len": 8192, "max_num_batched_tokens": 8192,
                    "kv_cache_memory_bytes": 16 << 30}}


def one_cluster(requests: int, seed: int, args: argparse.Namespace) -> list[float]:
    """TTFTs (s) in send order of `requests` disaggregated requests to a fresh cluster."""
    sections: dict[str, Any] = copy.deepcopy(ON_GPU) if args.gpu else {}
    if args.shape != "small":
        merge_mappings(sections, copy.deepcopy(LARGE))
    if args.no_layer_wise:
        merge_mappings(sections, {"server": {"layer_wise_kv": False}})
    with (small_cluster(max_num_seqs=16, sections=sections, shape=args.shape) as (ready, _),
          tempfile.TemporaryDirectory() as out):
        subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "--target", ready.targets[0], "--rate", "1",
                        "--num-requests", str(requests), "--input-len", f"fixed:{args.input_len}",
                        "--output-len", "fixed:8", "--seed", str(seed), "--out", out, "--no-progress"],
                       check=True, capture_output=True,
                       timeout=120 + 5 * requests)
        rows = json.loads((Path(out) / "results.json").read_text())["runs"][0]["requests"]
    if not all(r["disaggregated"] for r in rows):
        raise SystemExit("a request was prefilled locally: the comparison needs every one disaggregated")
    return [r["ttft_s"] for r in sorted(rows, key=lambda r: r["sent_s"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=3, help="fresh clusters, one after another")
    ap.add_argument("--requests", type=int, default=8, help="per cluster (at least 3)")
    ap.add_argument("--gpu", action="store_true", help="both instances on one GPU")
    ap.add_argument("--shape", default="small", help="the dummy model's shape (pdserve/dummy_model.py)")
    ap.add_argument("--input-len", type=int, default=64, help="prompt tokens (over the 32-token local limit)")
    ap.add_argument("--no-layer-wise", action="store_true", help="server.layer_wise_kv: false (the KV after the "
                                                                     "whole prefill)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.requests < 3:
        raise SystemExit("--requests must be at least 3")
    runs = []
    for i in range(args.clusters):
        ttft = one_cluster(args.requests, 1 + i, args)
        rest = statistics.median(ttft[1:])
        runs.append({"ttft_s": ttft, "first_s": ttft[0], "rest_median_s": rest})
        print(f"cluster {i + 1}: first request {1e3 * ttft[0]:.0f} ms, the rest {1e3 * rest:.0f} ms median "
              f"({ttft[0] / rest:.2f}x); all: {', '.join(f'{1e3 * t:.0f}' for t in ttft)} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
