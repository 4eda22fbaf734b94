"""Paged attention through flash-attn's varlen kernel (`flash_attn_varlen_func` with `block_table`), when the
optional `flash-attn` package is importable. New K/V are stored by the Triton store kernel.

flash-attn reads a paged cache as [num_blocks, page_size, Hkv, D]; our per-layer views are
[num_blocks, Hkv, page_size, D], so we hand it a permuted (strided, last dim contiguous) view, no copy.
NOTE: flash-attn 2 requires page_size % 256 == 0; `supports` refuses other block sizes so that "auto" picks
Triton instead."""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.kv_cache import KVCache


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class FlashAttnPagedAttention(AttentionBackend):
    name = "flash-attn"

    @staticmethod
    def supports(device: str, dtype: torch.dtype, block_size: int, head_dim: int) -> str | None:
        """None if this backend can serve the configuration, else the reason it cannot."""
        if device != "cuda":
            return f"flash-attn needs a CUDA device (device is {device})"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs float16 or bfloat16 (dtype is {dtype})"
        if not flash_attn_available():
            return "flash-attn is not installed (pip install 'pdserve[flash-attn]')"
        if block_size % 256:
            return f"flash-attn's paged kernels need block_size % 256 == 0 (block_size is {block_size})"
        if head_dim % 8 or head_dim > 256:
            return f"flash-attn needs head_dim % 8 == 0 and <= 256 (head_dim is {head_dim})"
        return None

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, block_size)
        # NOTE: resolved here, not at import: this module is imported on every machine, flash-attn and Triton
        # exist only where this backend was selected.
        from flash_attn import flash_attn_varlen_func

        from engine.attention.triton_backend import store_kv

        self._varlen, self._store = flash_attn_varlen_func, store_kv

    def prepare(self, meta: AttentionMetadata) -> None:
        seq_lens = meta.seq_lens  # [B] int32
        self._cu_k = torch.nn.functional.pad(torch.cumsum(seq_lens, 0, dtype=torch.int32), (1, 0))  # [B+1]

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        self._store(k, v, kv_cache, layer, meta.slot_mapping)
        kc = kv_cache.k[layer].permute(0, 2, 1, 3)  # [num_blocks, bs, Hkv, D]
        vc = kv_cache.v[layer].permute(0, 2, 1, 3)  # [num_blocks, bs, Hkv, D]
        # NOTE: flash-attn aligns the causal mask to the bottom right when q is shorter than k, which is our
        # semantics: the q_len new tokens are the last q_len of the seq_len-token context.
        return self._varlen(
            q, kc, vc, cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=self._cu_k,
            max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len, softmax_scale=self.scale,
            causal=True, block_table=meta.block_tables,
        )
