"""The Triton paged-attention kernels on one GPU, against PyTorch's fused SDPA (flash) on contiguous K/V in the
same run, and against the KV bandwidth floor for decode.

    python bench/attention_kernels.py [--sweep] [--json out.json]

Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128), bf16, pages of 16 tokens placed
at random in the cache. Prefill: one fresh causal sequence of --prefill-len tokens. Decode: batch 1 and 32 at
context --decode-ctx, timed inside a CUDA graph as the engine runs it; its floor is the KV bytes read divided by
the device copy bandwidth measured here.
--sweep times the prefill kernel over tile configurations (BLOCK_M, BLOCK_N, warps, stages); --split-sweep times
the decode kernel at several context-split counts (TritonPagedAttention.programs_per_sm).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from gpu_baselines import copy_bandwidth, report, time_cuda  # bench/, the script's folder

from engine.attention import AttentionMetadata
from engine.attention.triton_backend import TritonPagedAttention
from engine.kv_cache import KVCache, KVLayout

HQ, HKV, D, BS = 32, 8, 128, 16


def _time_graph(fn, reps: int = 20) -> float:  # type: ignore[no-untyped-def]
    """Device time per call: `reps` calls captured in one CUDA graph (no Python launch cost in the figure)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return time_cuda(graph.replay, 5) / reps


def _setup(seq_lens: list[int], q_lens: list[int]) -> tuple[KVCache, AttentionMetadata, torch.Tensor]:
    blocks = [-(-s // BS) for s in seq_lens]
    layout = KVLayout(sum(blocks) + 8, HKV, 1, BS, D, 2)
    cache = KVCache(layout, torch.bfloat16, "cuda")
    cache.tensor.normal_()
    perm = torch.randperm(layout.num_blocks)[: sum(blocks)]
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)  # [B, max_blocks]
    at = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[at : at + n]
        at += n
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    T = int(qsl[-1])
    meta = AttentionMetadata(
        slot_mapping=torch.full((T,), -1, dtype=torch.int64, device="cuda"),  # timing attention only
        query_start_loc=qsl.cuda(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables.cuda(), max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    q = torch.randn(T, HQ, D, dtype=torch.bfloat16, device="cuda")  # [T, Hq, D]
    return cache, meta, q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--decode-ctx", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--split-sweep", action="store_true", help="decode: time programs_per_sm 1, 2, 4, 8")
    ap.add_argument("--json")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    res["copy_GBps"] = copy_bandwidth() / 1e9

    L = args.prefill_len
    cache, meta, q = _setup([L], [L])
    attn = TritonPagedAttention(HQ, HKV, D, D**-0.5, BS)
    kv = torch.randn(L, HKV, D, dtype=torch.bfloat16, device="cuda")
    flops = 4 * HQ * D * L * (L + 1) / 2
    qs, kvs = q.transpose(0, 1).unsqueeze(0), kv.transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
    t_sdpa = time_cuda(lambda: F.scaled_dot_product_attention(qs, kvs, kvs, is_causal=True, enable_gqa=True), 10)
    res["prefill"] = {"tokens": L, "sdpa_TFLOPs": flops / t_sdpa / 1e12}
    configs = [attn.prefill_cfg]
    if args.sweep:
        configs += [(m, nn, w, s) for m in (64, 128) for nn in (32, 64, 128) for w in (4, 8) for s in (2, 3)
                    if (m, nn, w, s) != attn.prefill_cfg]
    sweep = {}
    for cfg in configs:
        attn.prefill_cfg = cfg
        attn.prepare(meta)
        try:
            t = time_cuda(lambda: attn.forward(0, q, kv, kv, cache, meta), 10)
        except Exception as e:  # a tile configuration that does not fit in shared memory
            sweep[str(cfg)] = f"failed: {type(e).__name__}"
            continue
        sweep[str(cfg)] = round(flops / t / 1e12, 1)
        print(f"prefill {cfg}: {sweep[str(cfg)]} TFLOP/s (sdpa {res['prefill']['sdpa_TFLOPs']:.1f})", flush=True)
    res["prefill"]["triton_TFLOPs"] = sweep

    res["decode"] = {}
    for b in (1, 32):
        cache, meta, q = _setup([args.decode_ctx] * b, [1] * b)
        kv = torch.randn(b, HKV, D, dtype=torch.bfloat16, device="cuda")
        kv_bytes = b * args.decode_ctx * HKV * D * 2 * 2
        qs = q.view(b, HQ, 1, D)
        ks = torch.randn(b, HKV, args.decode_ctx, D, dtype=torch.bfloat16, device="cuda")
        t_sdpa = _time_graph(lambda qs=qs, ks=ks: F.scaled_dot_product_attention(qs, ks, ks, enable_gqa=True))
        for per_sm in (1, 2, 4, 8) if args.split_sweep else (1,):
            attn = TritonPagedAttention(HQ, HKV, D, D**-0.5, BS)
            attn.programs_per_sm = per_sm
            attn.prepare(meta)
            t = _time_graph(lambda attn=attn, q=q, kv=kv, cache=cache, meta=meta: attn.forward(0, q, kv, kv, cache,
                                                                                                meta))
            row = {"us": t * 1e6, "of_floor": kv_bytes / t / (res["copy_GBps"] * 1e9), "sdpa_us": t_sdpa * 1e6,
                   "splits": attn.decode_splits(b), "programs_per_sm": per_sm}
            res["decode"].setdefault(b, []).append(row)
            print(f"decode batch {b}: {json.dumps(row)}", flush=True)
    report(res, args.json)


if __name__ == "__main__":
    main()
