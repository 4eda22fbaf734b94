"""Host time of planning one KV read (`kv_transfer.plan`), the part of a read's posting that runs before any
byte moves: block indices, the merged-descriptor count and `plan_reads`' descriptor rows, for the Llama-3-8B KV
geometry (32 layers in 4 layer groups, 8 KV heads of 128, 16-token blocks, bf16: 512 KiB a block and group).

    .venv/bin/python bench/plan_reads_cost.py [--calls 2000]

Pure CPU, one thread; a ratio between two versions of the code is what it is for (run both on the same machine).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from kv_transfer.descriptor import PROTOCOL_VERSION, AgentDescriptor
from kv_transfer.plan import all_groups, merged_descriptors, plan_reads, unit_indices

GROUPS, LAYERS, HEADS, DIM, BLOCK = 4, 32, 8, 128, 16


def descriptor(name: str, base: int) -> AgentDescriptor:
    head_bytes = (LAYERS // GROUPS) * 2 * BLOCK * DIM * 2  # one head of one block in one layer group: K and V
    return AgentDescriptor(PROTOCOL_VERSION, name, name, b"", "VRAM", 0, base, 4096, BLOCK, HEADS * head_bytes,
                           head_bytes, HEADS, HEADS, LAYERS, DIM, 0, 1, "bfloat16", "f", num_layer_groups=GROUPS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    local, remote = descriptor("reader", 1 << 40), descriptor("holder", 1 << 41)
    rng = random.Random(1)
    cases = [("32 contiguous blocks (64 MB)", list(range(100, 132)), list(range(200, 232))),
             ("32 scattered blocks (64 MB)", rng.sample(range(4096), 32), rng.sample(range(4096), 32)),
             ("256 contiguous blocks (512 MB)", list(range(100, 356)), list(range(1000, 1256)))]
    for label, lb, rb in cases:
        t0 = time.perf_counter()
        for _ in range(args.calls):
            li = unit_indices(local, np.asarray(lb), all_groups(local))
            ri = unit_indices(remote, np.asarray(rb), all_groups(local))
            merged_descriptors(local, remote, li, ri)
        t1 = time.perf_counter()
        for _ in range(args.calls):
            (plan,) = plan_reads(local, [remote], lb, rb, 1 << 62, all_groups(local))
        t2 = time.perf_counter()
        print(f"{label:32s} indices + merge {1e6 * (t1 - t0) / args.calls:6.1f} us   plan_reads "
              f"{1e6 * (t2 - t1) / args.calls:6.1f} us   ({len(plan.local_rows)} descriptors)", flush=True)


if __name__ == "__main__":
    main()
