"""The attention-backend seam. The model calls `backend.forward(layer, q, k, v, kv_cache, meta)` once per
layer per step for the whole flattened batch; a backend writes the new K/V into the paged cache and attends
over each sequence's cached context. GPU kernels (Triton, flash-attn) plug in here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.kv_cache import KVCache

if TYPE_CHECKING:
    from engine.models.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Per-step batch description, shared by all layers. Requests appear in batch order; request b owns the
    flattened tokens query_start_loc[b]:query_start_loc[b+1], which are the last q_len tokens of its
    seq_lens[b]-token context."""

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset, where each new token's K/V goes
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32; entries past a sequence's blocks are never read
    max_query_len: int
    max_seq_len: int


class AttentionBackend(ABC):
    name: str = "abstract"
    dense_prefill_steps: int = 0  # steps that attended with SDPA over a fresh prompt (the Triton backend's path)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int) -> None:
        self.num_heads = num_heads  # on this rank
        self.num_kv_heads = num_kv_heads  # on this rank
        self.head_dim = head_dim
        self.scale = scale
        self.block_size = block_size

    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per step before the first layer: precompute index tensors shared by all layers."""
        return None

    @abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Write k, v at meta.slot_mapping in layer `layer` of the cache, then return causal attention of each
        query token over its sequence's context (cached tokens plus this step's, up to itself)."""

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
        """`forward` after rotating q and k by `positions`. A backend may fuse the rotation into its K/V store;
        q and k may then be modified in place, or not at all (the keys reach the cache rotated either way)."""
        q, k = rope.apply(positions, q, k)
        return self.forward(layer, q, k, v, kv_cache, meta)


def write_kv(kv_cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V ([T, Hkv, D] each) into the paged cache at `slot_mapping` ([T]).
    NOTE: every slot must be >= 0 here; padding slots (-1) exist only in CUDA-graph steps, which need the
    Triton backend (its store kernel skips them)."""
    bs = kv_cache.layout.block_size
    blocks = slot_mapping // bs  # [T]
    offsets = slot_mapping % bs  # [T]
    kv_cache.k[layer][blocks, :, offsets] = k
    kv_cache.v[layer][blocks, :, offsets] = v
