"""`pdserve` command line. Until the cluster lands, `demo` runs an offline generation on a dummy model."""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time


def _demo(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    from pdserve.dummy_model import write_dummy_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_dummy_model(tmp, args.shape)
        print(f"pdserve demo: {args.shape} model with dummy weights, {args.requests} requests", flush=True)
        llm = LLM(model=str(model_dir), load_format="dummy", dtype="float32", block_size=16,
                  max_model_len=1024, max_num_batched_tokens=512)
        rng = random.Random(0)
        shared = [rng.randrange(3, 4000) for _ in range(64)]
        prompts = [shared + [rng.randrange(3, 4000) for _ in range(rng.randrange(8, 200))]
                   for _ in range(args.requests)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        for i, out in enumerate(outs):
            print(f"  request {i}: prompt {len(out.prompt_token_ids)} tokens, cached {out.num_cached_tokens}, "
                  f"generated {len(out.token_ids)} ({out.finish_reason}): {out.token_ids[:8]}...")
        gen = sum(len(o.token_ids) for o in outs)
        stats = llm.engine.stats()
        print(f"pdserve demo: {gen} tokens in {elapsed:.2f} s ({gen / elapsed:.1f} tok/s on this machine), "
              f"prefix-cache hits {stats.prefix_cache_hits}/{stats.prefix_cache_queries} prompt tokens")
        llm.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a small end-to-end generation with a dummy-weights model")
    demo.add_argument("--shape", default="small", help="model shape (small, llama3-8b)")
    demo.add_argument("--requests", type=int, default=8)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
