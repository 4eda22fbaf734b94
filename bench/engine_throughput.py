"""Engine throughput on this machine: continuous batching vs static batching vs one request at a time.

All three modes run in one process on the same dummy-weights model and the same requests (random prompt and
output lengths), so the ratios compare like with like:
  - sequential:  each request alone, start to finish;
  - static:      batches of --batch requests; a batch ends only when its longest request does;
  - continuous:  every request queued at once; the scheduler refills a slot as soon as one frees.

    .venv/bin/python bench/engine_throughput.py --shape small --requests 48 --batch 16
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable

import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from pdserve.dummy_model import write_dummy_model


def workload(n: int, seed: int, vocab: int, in_range: tuple[int, int], out_range: tuple[int, int]):
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(*in_range))], rng.randint(*out_range))
            for _ in range(n)]


def run(engine: LLMEngine, reqs: list[tuple[list[int], int]], group: int) -> tuple[float, int]:
    """Add `group` requests at a time and drain the engine before adding the next group."""
    start = time.perf_counter()
    tokens = 0
    for g in range(0, len(reqs), group):
        for i, (prompt, out_len) in enumerate(reqs[g : g + group]):
            engine.add_request(f"q{g + i}", prompt, SamplingParams(max_tokens=out_len, temperature=0.0,
                                                                    ignore_eos=True))
        while engine.has_unfinished_requests():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16, help="max_num_seqs, and the static batch size")
    ap.add_argument("--input-len", type=int, nargs=2, default=(32, 256))
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 128))
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = write_dummy_model(tmp, args.shape)
        cfg = EngineConfig(model=str(model), load_format="dummy", dtype="float32", max_model_len=1024,
                           max_num_seqs=args.batch, max_num_batched_tokens=1024, enable_prefix_caching=False)
        engine = LLMEngine(cfg)
        reqs = workload(args.requests, 0, cfg.model_config.vocab_size, args.input_len, args.output_len)
        run(engine, reqs[:2], 2)  # warm-up
        modes: dict[str, Callable[[], tuple[float, int]]] = {
            "sequential": lambda: run(engine, reqs, 1),
            "static": lambda: run(engine, reqs, args.batch),
            "continuous": lambda: run(engine, reqs, len(reqs)),
        }
        results = {}
        for name, fn in modes.items():
            secs, toks = fn()
            results[name] = {"seconds": secs, "output_tokens": toks, "tok_per_s": toks / secs}
            print(f"{name:>11}: {toks} tokens in {secs:6.2f} s = {toks / secs:8.1f} tok/s", flush=True)
        engine.shutdown()
    base = results["sequential"]["tok_per_s"]
    static = results["static"]["tok_per_s"]
    cont = results["continuous"]["tok_per_s"]
    print(f"continuous / sequential = {cont / base:.2f}x   continuous / static = {cont / static:.2f}x   "
          f"static / sequential = {static / base:.2f}x   (torch threads: {torch.get_num_threads()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
