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
import inspect
import json
import os
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


LAYOUT = (1, 1)  # (layers, layer groups) of the cache the kernels read layer 0 of (--layers, --layer-groups)


def _setup(seq_lens: list[int], q_lens: list[int], ordered: bool = False) -> tuple[KVCache, AttentionMetadata,
                                                                                    torch.Tensor]:
    """`ordered`: each sequence's pages in order and adjacent in memory (one contiguous run), not at random."""
    blocks = [-(-s // BS) for s in seq_lens]
    layout = KVLayout(sum(blocks) + 8, HKV, LAYOUT[0], BS, D, 2, LAYOUT[1])
    cache = KVCache(layout, torch.bfloat16, "cuda")
    cache.tensor.normal_()
    perm = (torch.arange if ordered else torch.randperm)(layout.num_blocks)[: sum(blocks)]
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


def _varlen():  # type: ignore[no-untyped-def]
    """torch's flash varlen attention, when this torch has it (a candidate, not used by the engine)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    def call(*args, **kw):  # type: ignore[no-untyped-def]
        # NOTE: torch 2.11's form has no enable_gqa (GQA by head counts) and no block_table (no paged KV)
        if "block_table" in kw and "block_table" not in params:
            raise NotImplementedError("this torch's varlen_attn has no block_table")
        return varlen_attn(*args, **{k: v for k, v in kw.items() if k in params})
    return call


def _sdpa_backends(timer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> dict:  # type: ignore[no-untyped-def]
    """Seconds per call of each fused SDPA backend on these inputs (the default SDPA picks one of them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out: dict = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def call(backend=backend):  # type: ignore[no-untyped-def]
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        try:
            out[backend.name] = timer(call)
        except RuntimeError as e:
            out[backend.name] = f"unsupported: {str(e)[:120]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--decode-ctx", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--split-sweep", action="store_true", help="decode: time programs_per_sm 1, 2, 4, 8")
    ap.add_argument("--decode-sweep", action="store_true", help="decode: time (BLOCK_N, warps, stages) tiles")
    ap.add_argument("--ordered-pages", action="store_true", help="pages in order and adjacent (what paging "
                    "costs: the same kernel without scattered pages)")
    ap.add_argument("--layers", type=int, default=1, help="layers of the cache (the kernels read layer 0): with "
                    "--layer-groups, sets the page stride of the engine's layout (docs/kv-layout.md)")
    ap.add_argument("--layer-groups", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    global LAYOUT
    LAYOUT = (args.layers, args.layer_groups)
    res: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                 "ordered_pages": args.ordered_pages, "layers": args.layers, "layer_groups": args.layer_groups}
    res["copy_GBps"] = copy_bandwidth() / 1e9

    L = args.prefill_len
    cache, meta, q = _setup([L], [L], args.ordered_pages)
    attn = TritonPagedAttention(HQ, HKV, D, D**-0.5, BS)
    kv = torch.randn(L, HKV, D, dtype=torch.bfloat16, device="cuda")
    flops = 4 * HQ * D * L * (L + 1) / 2
    # NOTE: K and V are distinct tensors: with one tensor for both, SDPA reads half the bytes (decode was 2x
    # flattered by that until 2026-11-30)
    vv = torch.randn_like(kv)
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, kv, vv))  # [1, H, L, D]
    t_sdpa = time_cuda(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True), 10)
    res["prefill"] = {"tokens": L, "sdpa_TFLOPs": flops / t_sdpa / 1e12}
    res["prefill"]["sdpa_backends_TFLOPs"] = {
        name: t if isinstance(t, str) else flops / t / 1e12
        for name, t in _sdpa_backends(lambda f: time_cuda(f, 10), qs, ks, vs, True).items()}
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    flash = _varlen()
    if flash is not None:
        t = time_cuda(lambda: flash(q, kv, vv, cu, cu, L, L, window_size=(-1, 0), enable_gqa=True), 10)
        res["prefill"]["varlen_contiguous_TFLOPs"] = flops / t / 1e12
        tables, seq_lens = meta.block_tables, meta.seq_lens
        kp, vp = cache.k[0].transpose(1, 2), cache.v[0].transpose(1, 2)  # [blocks, bs, Hkv, D] strided views
        try:
            t = time_cuda(lambda: flash(q, kp, vp, cu, None, L, L, window_size=(-1, 0), enable_gqa=True,
                                        seqused_k=seq_lens, block_table=tables), 10)
            res["prefill"]["varlen_paged_TFLOPs"] = flops / t / 1e12
        except (RuntimeError, NotImplementedError) as e:  # the paged form may refuse our strides
            res["prefill"]["varlen_paged_TFLOPs"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    print(f"prefill baselines: {json.dumps(res['prefill'])}", flush=True)
    configs = [attn.prefill_cfg]
    if args.sweep:
        configs += [(m, nn, w, s) for m in (64, 128) for nn in (32, 64, 128) for w in (4, 8) for s in (2, 3)
                    if (m, nn, w, s) != attn.prefill_cfg]
    sweep = {}
    # NOTE: the engine attends a fresh prompt with SDPA (PDSERVE_DENSE_PREFILL); the paged kernel still serves
    # chunks after cached tokens and batches of several prompts: timed here with the dense path off
    os.environ["PDSERVE_DENSE_PREFILL"] = "1"
    attn.prepare(meta)
    assert attn._dense
    t = time_cuda(lambda: attn.forward(0, q, kv, kv, cache, meta), 10)
    res["prefill"]["engine_dense_TFLOPs"] = flops / t / 1e12
    print(f"prefill, the engine's dense path: {res['prefill']['engine_dense_TFLOPs']:.1f} TFLOP/s", flush=True)
    os.environ["PDSERVE_DENSE_PREFILL"] = "0"
    for cfg in configs:
        attn.prefill_cfg = cfg
        attn.prepare(meta)
        assert not attn._dense
        try:
            t = time_cuda(lambda: attn.forward(0, q, kv, kv, cache, meta), 10)
        except Exception as e:  # a tile configuration that does not fit in shared memory
            sweep[str(cfg)] = f"failed: {type(e).__name__}"
            continue
        sweep[str(cfg)] = round(flops / t / 1e12, 1)
        print(f"prefill {cfg}: {sweep[str(cfg)]} TFLOP/s (sdpa {res['prefill']['sdpa_TFLOPs']:.1f})", flush=True)
    res["prefill"]["triton_TFLOPs"] = sweep  # the paged kernel
    del os.environ["PDSERVE_DENSE_PREFILL"]

    res["decode"] = {}
    for b in (1, 32):
        cache, meta, q = _setup([args.decode_ctx] * b, [1] * b)
        kv = torch.randn(b, HKV, D, dtype=torch.bfloat16, device="cuda")
        kv_bytes = b * args.decode_ctx * HKV * D * 2 * 2
        qs = q.view(b, HQ, 1, D)
        ks = torch.randn(b, HKV, args.decode_ctx, D, dtype=torch.bfloat16, device="cuda")
        vs = torch.randn_like(ks)
        t_sdpa = _time_graph(lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(qs, ks, vs,
                                                                                       enable_gqa=True))
        extra: dict = {"sdpa_backends_us": {
            name: t if isinstance(t, str) else t * 1e6
            for name, t in _sdpa_backends(lambda f: _time_graph(f), qs, ks, vs, False).items()}}
        if flash is not None:
            cu_q = torch.arange(b + 1, dtype=torch.int32, device="cuda")
            kp, vp = cache.k[0].transpose(1, 2), cache.v[0].transpose(1, 2)
            try:
                t_fl = _time_graph(lambda q=q, kp=kp, vp=vp, cu_q=cu_q, meta=meta: flash(
                    q, kp, vp, cu_q, None, 1, args.decode_ctx, enable_gqa=True, seqused_k=meta.seq_lens,
                    block_table=meta.block_tables))
                extra["varlen_paged_us"] = t_fl * 1e6
            except (RuntimeError, NotImplementedError) as e:
                extra["varlen_paged_us"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        default = TritonPagedAttention(HQ, HKV, D, D**-0.5, BS)
        runs = [(per_sm, default.decode_cfg) for per_sm in ((1, 2, 4, 8) if args.split_sweep
                                                            else (default.programs_per_sm,))]
        if args.decode_sweep:
            runs += [(default.programs_per_sm, (default.decode_cfg[0], n, w, st)) for n in (32, 64, 128)
                     for w in (2, 4, 8) for st in (2, 3, 4) if (n, w, st) != default.decode_cfg[1:]]
        for per_sm, cfg in runs:
            attn = TritonPagedAttention(HQ, HKV, D, D**-0.5, BS)
            attn.programs_per_sm, attn.decode_cfg = per_sm, cfg
            attn.prepare(meta)
            try:
                t = _time_graph(lambda attn=attn, q=q, kv=kv, cache=cache, meta=meta: attn.forward(0, q, kv, kv,
                                                                                                    cache, meta))
            except Exception as e:  # a tile configuration that does not fit in shared memory
                print(f"decode batch {b} {cfg}: failed: {type(e).__name__}", flush=True)
                continue
            row = {"us": t * 1e6, "of_floor": kv_bytes / t / (res["copy_GBps"] * 1e9), "sdpa_us": t_sdpa * 1e6,
                   "splits": attn.decode_splits(b), "programs_per_sm": per_sm, "cfg": list(cfg), **extra}
            res["decode"].setdefault(b, []).append(row)
            print(f"decode batch {b}: {json.dumps(row)}", flush=True)
    report(res, args.json)


if __name__ == "__main__":
    main()
