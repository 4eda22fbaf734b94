"""Decode at tensor_parallel_size 2 with and without CUDA graphs, in one run on two GPUs.

    python bench/tp_decode_graphs.py --shape llama3-8b --batches 1 8 32 --json out.json

For each mode (eager, graphs) an engine at TP 2 serves B prompts of --prompt-len tokens, then --decode-steps
decode steps are timed (bench/gpu_throughput.py's `engine_decode`). The figure is the graphs' step rate over
the eager step rate at the same batch; TP 1 with graphs is measured too, as the single-GPU reference. The same
prompts' greedy tokens are compared between TP 2 eager and graphs and the result reported (bf16 with dummy
weights: near-flat logits, so this is a smoke check; tests/engine/test_executor.py asserts exactness in float32).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from typing import Any

import torch
from gpu_throughput import engine_decode  # bench/, the script's folder

from engine import EngineConfig, LLMEngine, SamplingParams
from pdserve.dummy_model import write_dummy_model


def greedy(engine: LLMEngine, n: int) -> list[list[int]]:
    vocab = engine.config.model_config.vocab_size
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, vocab, (17 + 31 * i,), generator=gen).tolist() for i in range(4)]
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    return [out[f"g{i}"] for i in range(len(prompts))]


def run_mode(model: str, tp: int, eager: bool, args: argparse.Namespace) -> dict[str, Any]:
    cfg = EngineConfig(model=model, load_format="dummy", dtype="bfloat16", max_num_seqs=max(args.batches),
                       max_num_batched_tokens=2048, enable_prefix_caching=False, enforce_eager=eager,
                       tensor_parallel_size=tp)
    engine = LLMEngine(cfg)
    runner = engine.executor.runner
    res: dict[str, Any] = {"tp": tp, "eager": eager, "cuda_graphs": runner.graphs is not None, "decode": {}}
    try:
        res["greedy"] = greedy(engine, 16)
        for b in args.batches:
            res["decode"][b] = engine_decode(engine, b, args.prompt_len, args.decode_steps, seed=b)
            print(f"tp {tp} {'eager' if eager else 'graphs'} batch {b}: {json.dumps(res['decode'][b])}", flush=True)
        res["counters"] = engine.metrics.snapshot().counters
    finally:
        engine.shutdown()
        del engine, runner
        gc.collect()
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                           "args": vars(args), "date": time.strftime("%Y-%m-%d"), "modes": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_dummy_model(tmp, args.shape))
        for tp, eager in ((2, True), (2, False), (1, False)):
            res["modes"].append(run_mode(model, tp, eager, args))
    eager2, graphs2, graphs1 = res["modes"]
    res["tokens_equal_tp2_eager_graphs"] = eager2["greedy"] == graphs2["greedy"]
    for b in args.batches:
        ratio = graphs2["decode"][b]["tok_s"] / eager2["decode"][b]["tok_s"]
        res.setdefault("graphs_over_eager", {})[b] = ratio
        print(f"batch {b}: TP2 graphs {graphs2['decode'][b]['step_ms']:.2f} ms/step, eager "
              f"{eager2['decode'][b]['step_ms']:.2f} ms/step: {ratio:.2f}x; TP1 graphs "
              f"{graphs1['decode'][b]['step_ms']:.2f} ms/step", flush=True)
    print(f"TP2 greedy tokens eager == graphs: {res['tokens_equal_tp2_eager_graphs']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
