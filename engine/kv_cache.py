"""The paged KV cache of one rank: a single allocation for all layers (layout in docs/kv-layout.md).

    kv[num_blocks, num_kv_heads_local, num_layers, 2, block_size, head_dim]

Block-major, then KV head, then layer: every byte of a block is one contiguous range (so runs of adjacent
blocks coalesce into one large transfer descriptor), and within a block the bytes of a contiguous range of KV
heads are contiguous too (so a rank of a higher-TP reader pulls exactly its heads as one piece per block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """The shape of one rank's KV allocation; everything a remote reader needs to address a block."""

    num_blocks: int
    num_kv_heads: int  # on this rank
    num_layers: int
    block_size: int
    head_dim: int
    element_size: int

    @property
    def head_bytes(self) -> int:
        """Bytes of one KV head of one block, all layers, K and V."""
        return self.num_layers * 2 * self.block_size * self.head_dim * self.element_size

    @property
    def block_bytes(self) -> int:
        return self.num_kv_heads * self.head_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes


class KVCache:
    def __init__(self, layout: KVLayout, dtype: torch.dtype, device: torch.device | str) -> None:
        self.layout = layout
        lo = layout
        # [num_blocks, H_kv, L, 2, block_size, D]
        self.tensor = torch.zeros(
            lo.num_blocks, lo.num_kv_heads, lo.num_layers, 2, lo.block_size, lo.head_dim, dtype=dtype,
            device=device,
        )
        # Per-layer strided views, built once: k/v [num_blocks, H_kv, block_size, D]
        self.k = [self.tensor[:, :, i, 0] for i in range(lo.num_layers)]
        self.v = [self.tensor[:, :, i, 1] for i in range(lo.num_layers)]

    @staticmethod
    def bytes_per_block(num_kv_heads: int, num_layers: int, block_size: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_kv_heads * num_layers * 2 * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()
