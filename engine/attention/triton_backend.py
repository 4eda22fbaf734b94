"""Paged attention on GPU with the Triton kernels of `triton_kernels.py`: two launches per layer (rotate q and k
and store the new K/V, attend; a third combines the splits of a small decode batch), no host synchronisation,
and fixed launch shapes for decode-only steps so they can be captured in a CUDA graph."""

from __future__ import annotations

import math

import torch

from engine import envs, pdl
from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.attention.dense_prefill import DENSE_DTYPES, DENSE_PREFILL_MIN_TOKENS, dense_causal_attention
from engine.attention.triton_kernels import (
    paged_attention_kernel,
    paged_decode_split_kernel,
    reduce_splits_kernel,
    rope_store_kv_kernel,
    store_kv_kernel,
)
from engine.kv_cache import KVCache
from engine.models import fused_ops
from engine.models.rotary import RotaryEmbedding

LOG2E = 1.4426950408889634


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonPagedAttention(AttentionBackend):
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, block_size)
        self.group = num_heads // num_kv_heads
        self.block_d = max(16, _pow2(head_dim))
        # Decode tiles hold one token's GROUP heads (at least 16 rows, tl.dot's minimum); prefill tiles hold
        # 64 rows. BLOCK_N spans whole pages so a page's rows are contiguous in the gathered tile.
        # (BLOCK_M, BLOCK_N, num_warps, num_stages). The prefill one won bench/attention_kernels.py --sweep on an
        # H100 (2026-11-22): 350 TFLOP/s at 8k tokens against 335 for (128, 64, 8, 2).
        self.decode_cfg = (max(16, _pow2(self.group)), max(64, block_size), 4, 2)
        self.prefill_cfg = (max(64, _pow2(self.group)), max(64, block_size), 4, 2)
        self._launch: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._splits = 1
        self._dense = False  # this step is one fresh prompt: SDPA over its contiguous K/V (see prepare)
        self._bucket = 0  # ...its length padded up to a multiple of this (PDSERVE_DENSE_PREFILL_BUCKET; 0: not)
        self.dense_prefill_steps = 0  # steps that took that path (bf16/fp16 ones; float32 stays paged)
        self.num_sms = torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() \
            else 132
        # Decode programs wanted per SM before the context is split further. NOTE: 2, not 1: at batch 32 and
        # context 580 on an H200 two splits took 27.4 us a layer against 31.0 for one, four 32.5
        # (bench/attention_kernels.py --split-sweep --decode-ctx 580, 2026-11-22).
        self.programs_per_sm = 2

    def decode_splits(self, batch: int) -> int:
        """How many programs share one decode sequence's context: enough to fill the GPU at small batch.
        NOTE: a function of the batch size alone, so a CUDA graph captured for a bucket stays valid."""
        programs, target = batch * self.num_kv_heads, self.programs_per_sm * self.num_sms
        if programs >= target:
            return 1
        return min(16, _pow2(-(-target // programs)))

    def prepare(self, meta: AttentionMetadata) -> None:
        """Launch shape for this step. NOTE: only host ints from `meta` are read, never device tensors."""
        self._splits = 1
        # NOTE: one sequence with no cached context (its whole K/V is this step's): PyTorch's fused SDPA over the
        # contiguous q/k/v (cuDNN on Hopper: 607 against our paged kernel's 354 TFLOP/s at 8k tokens,
        # bench/attention_kernels.py, 2026-11-30). Several prompts in one step, or a chunk after cached tokens,
        # stay on the paged kernel: SDPA has no varlen form here without a per-sequence loop.
        self._dense = (meta.seq_lens.shape[0] == 1 and meta.max_query_len == meta.max_seq_len
                       and meta.max_query_len >= DENSE_PREFILL_MIN_TOKENS and envs.PDSERVE_DENSE_PREFILL.get())
        self.dense_prefill_steps += self._dense
        self._bucket = envs.PDSERVE_DENSE_PREFILL_BUCKET.get() if self._dense else 0
        if meta.max_query_len <= 1:
            block_m, block_n, warps, stages = self.decode_cfg
            self._splits = self.decode_splits(meta.seq_lens.shape[0])
        else:
            block_m, block_n, warps, stages = self.prefill_cfg
        tiles = math.ceil(max(1, meta.max_query_len) / (block_m // self.group))
        self._launch = (block_m, block_n, tiles, warps, stages)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        store_kv(k, v, kv_cache, layer, meta.slot_mapping)
        if self._dense and q.dtype in DENSE_DTYPES:
            return self._attend_dense(q, k, v)
        return self._attend(layer, q, kv_cache, meta)

    def forward_rotary(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D] not yet rotated
        k: torch.Tensor,  # [T, Hkv, D] not yet rotated
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rope: RotaryEmbedding,
        positions: torch.Tensor,  # [T] int64
    ) -> torch.Tensor:  # [T, Hq, D]
        """One kernel rotates q in place and stores rotated keys and the values (k itself stays unrotated)."""
        if not fused_ops.enabled(q):  # PDSERVE_FUSED_OPS=0: the separate kernels, for A/B runs
            return super().forward_rotary(layer, q, k, v, kv_cache, meta, rope, positions)
        dense = self._dense and q.dtype in DENSE_DTYPES
        rope_store_kv(q, k, v, kv_cache, layer, meta.slot_mapping, positions, rope.cos, rope.sin, write_k=dense)
        if dense:
            return self._attend_dense(q, k, v)
        return self._attend(layer, q, kv_cache, meta)

    def _attend_dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of one fresh sequence over this step's rotated q, k, v ([T, H, D] each, any row
        strides) -> [T, Hq, D] in q's memory order (engine/attention/dense_prefill.py; its length padded to
        PDSERVE_DENSE_PREFILL_BUCKET when that is set)."""
        return dense_causal_attention(q, k, v, self.scale, self.group > 1, self._bucket)

    def _attend(self, layer: int, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        kc, vc = kv_cache.k[layer], kv_cache.v[layer]  # [num_blocks, Hkv, bs, D] each, strided views
        out = torch.empty_like(q)
        block_m, block_n, tiles, warps, stages = self._launch
        B = meta.seq_lens.shape[0]
        tables = meta.block_tables
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        if self._splits > 1:
            S = self._splits
            part_acc = torch.empty(B, S, self.num_heads, self.head_dim, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(B, S, self.num_heads, 2, dtype=torch.float32, device=q.device)
            paged_decode_split_kernel[(B, S, self.num_kv_heads)](
                part_acc, part_ml, q, kc, vc, tables, meta.seq_lens, self.scale * LOG2E,
                q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), tables.stride(0),
                GROUP=self.group, NUM_HEADS=self.num_heads, HEAD_DIM=self.head_dim, BLOCK_D=self.block_d,
                BLOCK_SIZE=self.block_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLITS=S, PRECISION=precision,
                USE_PDL=pdl.enabled(), num_warps=warps, num_stages=stages, **pdl.launch_kwargs(),
            )
            reduce_splits_kernel[(B, self.num_heads)](
                out, part_acc, part_ml, out.stride(0), out.stride(1),
                NUM_HEADS=self.num_heads, HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, SPLITS=S,
                USE_PDL=pdl.enabled(), **pdl.launch_kwargs(),
            )
            return out
        paged_attention_kernel[(B, tiles, self.num_kv_heads)](
            out, q, kc, vc, tables, meta.seq_lens, meta.query_start_loc, self.scale * LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2), tables.stride(0),
            GROUP=self.group, HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, BLOCK_SIZE=self.block_size,
            BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
            USE_PDL=pdl.enabled(), num_warps=warps, num_stages=stages, **pdl.launch_kwargs(),
        )
        return out


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, layer: int, slot_mapping: torch.Tensor) -> None:
    """Write k, v ([T, Hkv, D], any row/head strides) at slot_mapping ([T]; -1 = skip) in layer `layer`."""
    kc, vc = kv_cache.k[layer], kv_cache.v[layer]  # [num_blocks, Hkv, bs, D] each, strided views
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    store_kv_kernel[(k.shape[0],)](
        k, v, kc, vc, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        NUM_KV_HEADS=num_kv_heads, BLOCK_H=_pow2(num_kv_heads), HEAD_DIM=head_dim, BLOCK_D=max(16, _pow2(head_dim)),
        BLOCK_SIZE=kv_cache.layout.block_size, USE_PDL=pdl.enabled(), **pdl.launch_kwargs(),
    )


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, layer: int,
                  slot_mapping: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  write_k: bool = False) -> None:
    """Rotate q ([T, Hq, D]) in place; store rotated k and v ([T, Hkv, D]) at slot_mapping ([T]; -1 = skip) in
    layer `layer` (and with `write_k`, rotate k in place too). positions [T]; cos/sin [P, D] tables."""
    kc, vc = kv_cache.k[layer], kv_cache.v[layer]  # [num_blocks, Hkv, bs, D] each, strided views
    num_q, num_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    rope_store_kv_kernel[(q.shape[0],)](
        q, k, v, kc, vc, slot_mapping, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), cos.stride(0),
        NUM_Q=num_q, NUM_KV=num_kv, BLOCK_HQ=_pow2(num_q), BLOCK_HKV=_pow2(num_kv),
        HALF=head_dim // 2, BLOCK_HALF=_pow2(head_dim // 2), HEAD_DIM=head_dim, BLOCK_D=max(16, _pow2(head_dim)),
        BLOCK_SIZE=kv_cache.layout.block_size, USE_PDL=pdl.enabled(), WRITE_K=write_k, **pdl.launch_kwargs(),
    )
