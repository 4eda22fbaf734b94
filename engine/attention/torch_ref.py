"""Pure-PyTorch paged attention: the reference every other backend is checked against. Runs on CPU and GPU.

No loop over sequences: the batch is padded to [B, max_query_len] queries against [B, max_seq_len] keys
gathered through the block tables, with one mask for causality and padding.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata, write_kv
from engine.kv_cache import KVCache


class TorchPagedAttention(AttentionBackend):
    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        qsl = meta.query_start_loc.long()  # [B+1]
        q_lens = qsl[1:] - qsl[:-1]  # [B]
        num_tokens = int(qsl[-1])
        device = qsl.device
        self._req = torch.repeat_interleave(torch.arange(len(q_lens), device=device), q_lens)  # [T]
        self._qi = torch.arange(num_tokens, device=device) - qsl[:-1][self._req]  # [T] index within request
        # Absolute position of each padded query row: context start of the new tokens + row index.
        rows = torch.arange(meta.max_query_len, device=device)  # [Q]
        q_pos = (meta.seq_lens.long() - q_lens).unsqueeze(1) + rows  # [B, Q]
        keys = torch.arange(meta.max_seq_len, device=device)  # [S]
        self._mask = keys.view(1, 1, -1) <= q_pos.unsqueeze(-1)  # [B, Q, S] True = attend
        # Gather indices covering max_seq_len tokens of each block table.
        nblk = -(-meta.max_seq_len // self.block_size)
        self._tables = meta.block_tables[:, :nblk].long()  # [B, nblk]

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        write_kv(kv_cache, layer, k, v, meta.slot_mapping)
        B, S = meta.block_tables.shape[0], meta.max_seq_len
        Q, Hq, Hkv, D = meta.max_query_len, self.num_heads, self.num_kv_heads, self.head_dim
        G = Hq // Hkv
        # [B, nblk, Hkv, bs, D] -> [B, Hkv, nblk*bs, D] -> first S keys
        kc = kv_cache.k[layer][self._tables].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)[:, :, :S]
        vc = kv_cache.v[layer][self._tables].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)[:, :, :S]
        qp = q.new_zeros(B, Q, Hq, D)  # [B, Q, Hq, D]
        qp[self._req, self._qi] = q
        qp = qp.view(B, Q, Hkv, G, D).permute(0, 2, 3, 1, 4).float()  # [B, Hkv, G, Q, D]
        scores = torch.matmul(qp, kc.float().unsqueeze(2).transpose(-1, -2)) * self.scale  # [B, Hkv, G, Q, S]
        scores = scores.masked_fill(~self._mask.view(B, 1, 1, Q, S), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, vc.float().unsqueeze(2))  # [B, Hkv, G, Q, D]
        out = out.permute(0, 3, 1, 2, 4).reshape(B, Q, Hq, D)  # [B, Q, Hq, D]
        return out[self._req, self._qi].to(q.dtype)  # [T, Hq, D]
