"""What a lone fresh prompt's prefill costs when its length is new to the process, against a second prompt of the
same length: the dense prefill path (SDPA for one fresh bf16/fp16 prompt, `PDSERVE_DENSE_PREFILL`) at exact
lengths, the same with lengths padded to buckets (`PDSERVE_DENSE_PREFILL_BUCKET`, whose plans the engine's warm-up
builds), and the paged Triton kernel (dense off).

    python3 bench/prefill_shape_cost.py [--shape llama3-8b] [--lengths 24] [--base 3000] [--stride 7] \
        [--bucket 256] [--buckets 8] [--json OUT]

Why: a prefill instance's steps are mostly one fresh prompt each, every one of a new length, and on the H200 its
prompts took ~40-60 ms longer than the profile's step model and than the same prompts on an aggregated instance
(docs/performance.md, "Issue 21 on two H200s, seventh session"). A library that builds an execution plan per shape
(cuDNN's SDPA does) would cost exactly that on every new length, and more when a new kernel variant compiles. Each
request here is timed from `add_request` to its one output token (`max_tokens=1`: the prefill step and, with
async scheduling, the step that reads its token). Lengths are distinct between the modes, so "first" is a first
in each; every prompt has new random tokens (no prefix-cache hit).

First of all, before the modes touch any bucket: the first padded prompt of each of `--buckets` buckets (lengths
under 3,000, none a multiple of the bucket) against a second one of the same bucket. The warm-up ran each bucket's
exact length; if that built the plan the padded prompts use, the ratio is ~1 (on an H200 it was not, until the
dense path gave both the same layout: docs/performance.md, "A fresh cluster's first request on one H200").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

from engine import EngineConfig, LLMEngine, SamplingParams
from pdserve.dummy_model import write_dummy_model

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def timed_prefill(engine: LLMEngine, rid: str, tokens: list[int]) -> float:
    t0 = time.perf_counter()
    engine.add_request(rid, tokens, ONE_TOKEN)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_ms": 1e3 * statistics.median(xs), "p90_ms": 1e3 * xs[int(0.9 * (len(xs) - 1))],
            "max_ms": 1e3 * xs[-1]}


def report(results: dict[str, dict[str, object]], mode: str, first: list[float], again: list[float],
           first_name: str, again_name: str) -> None:
    """Record a mode's first and repeated timings in `results` and print them."""
    f, a = summary(first), summary(again)
    ratio = statistics.median(first) / statistics.median(again)
    results[mode] = {"first": f, "again": a, "first_over_again": ratio}
    print(f"{mode}: {first_name} {f['median_ms']:.1f} ms median (p90 {f['p90_ms']:.1f}, max {f['max_ms']:.1f}); "
          f"{again_name} {a['median_ms']:.1f} ms median (max {a['max_ms']:.1f}): {ratio:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", help="pdserve/dummy_model.py shape")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, default=24, help="distinct prompt lengths per mode")
    ap.add_argument("--base", type=int, default=3000, help="the first length")
    ap.add_argument("--stride", type=int, default=7, help="between lengths (odd: lengths of every residue)")
    ap.add_argument("--bucket", type=int, default=256, help="PDSERVE_DENSE_PREFILL_BUCKET of the bucketed mode")
    ap.add_argument("--buckets", type=int, default=8, help="buckets whose first padded prompt is timed (<= 10)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not 0 <= args.buckets <= 10 or args.bucket < 16:
        raise SystemExit("--buckets must be in 0..10 (their lengths stay under --base) and --bucket at least 16")
    model = write_dummy_model(tempfile.mkdtemp(), args.shape)
    modes = {"dense, exact lengths": ("1", "0"), f"dense, padded to {args.bucket}": ("1", str(args.bucket)),
             "paged (dense off)": ("0", "0")}
    top = args.base + len(modes) * args.lengths * args.stride + 16
    os.environ["PDSERVE_DENSE_PREFILL_BUCKET"] = str(args.bucket)  # NOTE: so that the warm-up builds its plans
    engine = LLMEngine(EngineConfig(model=str(model), load_format="dummy", dtype=args.dtype,
                                    max_num_batched_tokens=8192))
    if top > min(engine.config.max_num_batched_tokens, engine.config.max_model_len):
        engine.shutdown()
        raise SystemExit(f"prompts up to {top} tokens do not fit one step of this engine: lower --base or --lengths")
    vocab = engine.info.vocab_size
    rng = random.Random(0)
    results: dict[str, dict[str, object]] = {}
    try:
        if args.buckets:
            os.environ["PDSERVE_DENSE_PREFILL"], os.environ["PDSERVE_DENSE_PREFILL_BUCKET"] = "1", str(args.bucket)
            first, again = [], []
            for k in range(args.buckets):
                n = (k + 2) * args.bucket - 1 - k  # padded up to (k + 2) buckets; never a multiple of one
                first.append(timed_prefill(engine, f"b-{k}-a", [rng.randrange(3, vocab) for _ in range(n)]))
                again.append(timed_prefill(engine, f"b-{k}-b", [rng.randrange(3, vocab) for _ in range(n - 1)]))
            report(results, f"dense, padded to {args.bucket}: a bucket's first prompt after the warm-up", first,
                   again, "a bucket's first padded prompt", "a second prompt of the bucket")
        for m, (mode, (dense, bucket)) in enumerate(modes.items()):
            os.environ["PDSERVE_DENSE_PREFILL"], os.environ["PDSERVE_DENSE_PREFILL_BUCKET"] = dense, bucket
            first, again = [], []
            for i in range(args.lengths):
                n = args.base + (len(modes) * i + m) * args.stride
                first.append(timed_prefill(engine, f"{m}-{i}-a", [rng.randrange(3, vocab) for _ in range(n)]))
                again.append(timed_prefill(engine, f"{m}-{i}-b", [rng.randrange(3, vocab) for _ in range(n)]))
            report(results, mode, first, again, "a new length", "the same length again")
    finally:
        engine.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": engine.config.device, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
