"""The paged KV cache of one rank: a single allocation for all layers (layout in docs/kv-layout.md).

    kv[num_layer_groups, num_blocks, num_kv_heads_local, layers_per_group, 2, block_size, head_dim]

Layer group outermost, then block, then KV head, then layer: within a layer group every byte of a block is one
contiguous range (so runs of adjacent blocks coalesce into one large transfer descriptor per group), the bytes of
a contiguous range of KV heads are contiguous too (so a rank of a higher-TP reader pulls exactly its heads as one
piece per block and group), and a group's KV of a request can be read as soon as its layers are computed
(layer-wise streaming, kv_transfer/stream.py). One group is the layout of a block-major cache.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch


def layer_groups_for(num_layers: int, requested: int) -> int:
    """The number of layer groups a cache of `num_layers` layers gets when `requested` are asked for: the largest
    divisor of num_layers that is <= requested (groups are equal, so each is one strided slab)."""
    if requested < 1:
        raise ValueError(f"kv_layer_groups: {requested} must be >= 1")
    return max(g for g in range(1, min(requested, num_layers) + 1) if num_layers % g == 0)


@dataclass(frozen=True)
class KVLayout:
    """The shape of one rank's KV allocation; everything a remote reader needs to address a block."""

    num_blocks: int
    num_kv_heads: int  # on this rank
    num_layers: int
    block_size: int
    head_dim: int
    element_size: int
    num_layer_groups: int = 1

    def __post_init__(self) -> None:
        if self.num_layer_groups < 1 or self.num_layers % self.num_layer_groups:
            raise ValueError(f"{self.num_layer_groups} layer groups do not divide {self.num_layers} layers")

    @property
    def layers_per_group(self) -> int:
        return self.num_layers // self.num_layer_groups

    @property
    def head_bytes(self) -> int:
        """Bytes of one KV head of one block in one layer group (its layers, K and V)."""
        return self.layers_per_group * 2 * self.block_size * self.head_dim * self.element_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one layer group (the contiguous unit a transfer descriptor covers)."""
        return self.num_kv_heads * self.head_bytes

    @property
    def group_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layer_groups * self.group_bytes


class KVCache:
    def __init__(self, layout: KVLayout, dtype: torch.dtype, device: torch.device | str) -> None:
        self.layout = layout
        lo = layout
        shape = (lo.num_layer_groups, lo.num_blocks, lo.num_kv_heads, lo.layers_per_group, 2, lo.block_size,
                 lo.head_dim)
        self.memfd = -1  # on CPU: the memfd holding the cache, which a same-host reader may map (kv_transfer)
        if torch.device(device).type == "cpu":
            # NOTE: zero-filled shared memory instead of private pages: the same cost, and a reader on this host
            # can copy blocks out with memcpy (kv_transfer/local_copy.py)
            numel = math.prod(shape)
            self.memfd = os.memfd_create("pdserve-kv", os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, numel * torch.empty((), dtype=dtype).element_size())
            flat = torch.from_file(f"/proc/self/fd/{self.memfd}", shared=True, size=numel, dtype=dtype)
            self.tensor = flat.view(shape)  # [G, num_blocks, H_kv, L / G, 2, block_size, D]
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)  # [G, num_blocks, H_kv, L / G, 2, bs, D]
        # Per-layer strided views, built once: k/v [num_blocks, H_kv, block_size, D]
        per = lo.layers_per_group
        self.k = [self.tensor[i // per, :, :, i % per, 0] for i in range(lo.num_layers)]
        self.v = [self.tensor[i // per, :, :, i % per, 1] for i in range(lo.num_layers)]

    def block(self, block_id: int) -> torch.Tensor:
        """All of one block's KV, every group: [G, H_kv, L / G, 2, block_size, D] (a view)."""
        return self.tensor[:, block_id]

    def block_sums(self) -> list[float]:
        """Each block's sum over every layer (float32): a cheap fingerprint to check a copied block by."""
        return self.tensor.float().sum(dim=(0, 2, 3, 4, 5, 6)).tolist()

    @staticmethod
    def bytes_per_block(num_kv_heads: int, num_layers: int, block_size: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes of one block over all layers (what sizing the cache counts)."""
        return num_kv_heads * num_layers * 2 * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    def data_ptr(self) -> int:
        return self.tensor.data_ptr()

    def __del__(self) -> None:
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
