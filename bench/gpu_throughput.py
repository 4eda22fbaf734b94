"""Decode and prefill throughput of the engine on one GPU, each against baselines measured in the same run.

    python bench/gpu_throughput.py --shape llama3-8b --batches 1 32 --json out.json

Baselines, all measured first, in this process:
  - copy bandwidth: a 2 GiB device-to-device copy, bytes read + written per second;
  - bf16 matmul rate: an 8192^3 matmul, FLOP/s;
  - transformers `generate` (greedy, dummy weights of the same shape) at each decode batch size.

Decode (per batch size B): B prompts of --prompt-len tokens are prefilled, then --decode-steps steps are timed
once every request is decoding. The bandwidth floor of a step is (weight bytes + KV bytes read) / copy bandwidth;
weight bytes count every parameter a step reads (not the embedding table, of which it reads B rows).
The host time per step (schedule, inputs, launch, postprocess: everything but waiting for the device) comes
from the engine's own step timing; with async scheduling (the default; --sync turns it off) it overlaps the
device's work. The skinny-GEMM tuner's choices (cuBLAS against the Triton kernel per decode row count and weight
shape, with GB/s) are recorded too; PDSERVE_SKINNY_GEMM=0 keeps cuBLAS everywhere, PDSERVE_PDL=0 launches the
Triton kernels without programmatic dependent launch.

Prefill: one fresh prompt of --prefill-len tokens in one step (median of --repeats). MFU = model FLOPs / time /
measured matmul rate, with model FLOPs = 2 x (layer + lm_head-per-sampled-token) parameters x tokens plus causal
attention (4 x heads x head_dim x L(L+1)/2 per layer).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch
from gpu_baselines import copy_bandwidth, matmul_rate, report, time_cuda  # bench/, the script's folder

from engine import EngineConfig, LLMEngine, SamplingParams, pdl
from engine.models import skinny_gemm
from pdserve.dummy_model import write_dummy_model


def transformers_decode(model_dir: str, batches: list[int], prompt_len: int, steps: int) -> dict[int, float]:
    """tok/s of greedy decode with `generate`: (steps) extra tokens timed as t(1 + steps) - t(1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).eval()
    out: dict[int, float] = {}
    for b in batches:
        ids = torch.randint(3, cfg.vocab_size, (b, prompt_len), device="cuda")  # [B, P]

        def gen(n: int, ids: torch.Tensor = ids) -> None:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

        gen(2)
        # NOTE: 3 timed calls each: `generate` is bound by the host's Python, so a single call wanders with it.
        t1 = time_cuda(lambda gen=gen: gen(1), 3)
        tn = time_cuda(lambda gen=gen: gen(1 + steps), 3)
        out[b] = b * steps / (tn - t1)
        print(f"transformers batch {b}: {out[b]:.1f} tok/s", flush=True)
    return out


def host_cpu() -> str:
    """The host CPU's model name: the transformers baseline is launch-bound, so it follows the host."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def engine_decode(engine: LLMEngine, b: int, prompt_len: int, steps: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.config.model_config.vocab_size
    for i in range(b):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"d{seed}-{i}", prompt, SamplingParams(max_tokens=steps + 16, temperature=0.0,
                                                                  ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    for _ in range(3):  # warm
        engine.step()
    before = engine.metrics.snapshot()
    graphs = engine.executor.runner.graphs
    replays, replay_s = (graphs.replays, graphs.replay_host_s) if graphs else (0, 0.0)
    ctx = [r.num_tokens for r in engine.requests.values()]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    for rid in list(engine.requests):
        engine.abort_request(rid)
    engine.step()
    after = engine.metrics.snapshot()
    host_s, steps_timed = after.host_s - before.host_s, after.steps - before.steps
    launch_us = 1e6 * (graphs.replay_host_s - replay_s) / max(1, graphs.replays - replays) if graphs else 0.0
    return {"graph_launch_us": launch_us, "tok_s": b * steps / elapsed, "step_ms": 1e3 * elapsed / steps,
            "host_us_per_step": 1e6 * host_s / max(1, steps_timed),
            "mean_context": statistics.mean(ctx) + steps / 2}


def engine_prefill(engine: LLMEngine, length: int, repeats: int) -> float:
    times = []
    vocab = engine.config.model_config.vocab_size
    for i in range(repeats + 1):
        prompt = torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(1000 + i)).tolist()
        engine.add_request(f"p{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        torch.cuda.synchronize()
        start = time.perf_counter()
        steps, done = 0, False
        while not done:  # one forward; with async scheduling its token comes back from the next call
            done = any(o.request_id == f"p{i}" and o.finished for o in engine.step())
            steps += 1
        times.append(time.perf_counter() - start)
        assert engine.metrics.snapshot().steps and steps <= 2, "the prompt did not fit in one step"
    return statistics.median(times[1:])


def profile(engine: LLMEngine, out_dir: str, prefill_len: int, batch: int) -> None:
    """Kernel-time tables (torch.profiler) of one prefill step and of 8 decode steps at `batch`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    vocab = engine.config.model_config.vocab_size
    prompt = torch.randint(3, vocab, (prefill_len,), generator=torch.Generator().manual_seed(7)).tolist()
    engine.add_request("prof-prefill", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
    with open(f"{out_dir}/profile_prefill.txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    for i in range(batch):
        engine.add_request(f"prof-d{i}", prompt[:512], SamplingParams(max_tokens=64, temperature=0.0,
                                                                     ignore_eos=True))
    for _ in range(8):
        engine.step()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            engine.step()
    with open(f"{out_dir}/profile_decode_b{batch}.txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    for rid in list(engine.requests):
        engine.abort_request(rid)
    engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=8191)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--sync", action="store_true", help="async_scheduling off (read each step's tokens first)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--profile", metavar="DIR", help="also write torch.profiler tables of a prefill and a decode")
    args = ap.parse_args()

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "host_cpu": host_cpu(), "args": vars(args),
                           "date": time.strftime("%Y-%m-%d")}
    res["copy_GBps"] = copy_bandwidth() / 1e9
    res["matmul_TFLOPs"] = matmul_rate() / 1e12
    print(f"copy {res['copy_GBps']:.0f} GB/s, bf16 matmul {res['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_dummy_model(tmp, args.shape))
        hf = {} if args.skip_transformers else transformers_decode(model, args.batches, args.prompt_len,
                                                                    min(args.decode_steps, 64))
        gc.collect()  # the transformers model is gone with its frame; hand its memory back before ours loads
        torch.cuda.empty_cache()
        cfg = EngineConfig(model=model, load_format="dummy", dtype="bfloat16", max_num_seqs=max(args.batches),
                           max_num_batched_tokens=max(args.prefill_len, 2048), enable_prefix_caching=False,
                           attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                           async_scheduling=not args.sync)
        engine = LLMEngine(cfg)
        mc, runner = cfg.model_config, engine.executor.runner
        params = dict(runner.model.named_parameters())
        weight_bytes = sum(p.numel() * p.element_size() for n, p in params.items() if not n.startswith("embed_"))
        if mc.tie_word_embeddings:
            weight_bytes += params["embed_tokens.weight"].numel() * 2
        kv_per_token = mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * 2
        res.update(attention_backend=runner.attn.name, cuda_graphs=runner.graphs is not None,
                   async_scheduling=engine.config.async_scheduling, pdl=pdl.enabled(), weight_GB=weight_bytes / 1e9,
                   skinny_gemm=[{**asdict(c), "of_copy_bw": c.gbps / res["copy_GBps"]} for c in skinny_gemm.choices])
        res["decode"] = {}
        for b in args.batches:
            d = engine_decode(engine, b, args.prompt_len, args.decode_steps, seed=b)
            floor_s = (weight_bytes + b * d["mean_context"] * kv_per_token) / (res["copy_GBps"] * 1e9)
            d["floor_tok_s"] = b / floor_s
            d["of_floor"] = d["tok_s"] / d["floor_tok_s"]
            if b in hf:
                d["transformers_tok_s"] = hf[b]
                d["vs_transformers"] = d["tok_s"] / hf[b]
            res["decode"][b] = d
            print(f"decode batch {b}: {json.dumps(d)}", flush=True)
        t = engine_prefill(engine, args.prefill_len, args.repeats)
        L, H, D, n = args.prefill_len, mc.hidden_size, mc.head_dim, mc.num_hidden_layers
        layer_params = sum(p.numel() for name, p in params.items() if name.startswith("layers."))
        flops = 2 * layer_params * L + 2 * mc.vocab_size * H + 4 * n * mc.num_attention_heads * D * L * (L + 1) / 2
        res["prefill"] = {"tokens": L, "seconds": t, "tok_s": L / t, "TFLOPs": flops / t / 1e12,
                          "mfu": flops / t / (res["matmul_TFLOPs"] * 1e12)}
        print(f"prefill: {json.dumps(res['prefill'])}", flush=True)
        if args.profile:
            profile(engine, args.profile, args.prefill_len, max(args.batches))
        res["counters"] = engine.metrics.snapshot().counters  # fallbacks (PDL, fused ops, CUDA graphs ...)
        engine.shutdown()
    report(res, args.json)


if __name__ == "__main__":
    main()
