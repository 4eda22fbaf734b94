"""Pure-PyTorch paged attention: the reference every other backend is checked against. Runs on CPU and GPU.

No loop over sequences. The batch is split into two groups, decodes (one query token) and prefill chunks, and
each group is padded to [B_g, max_query_len_g] queries against [B_g, max_seq_len_g] keys gathered through the
block tables, with one mask for causality and padding.
NOTE: one padded group for the whole batch would make a step that mixes a 256-token prefill chunk with 15
decodes pay for 16 padded prefills (measured: continuous batching then ran slower than static batching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata, write_kv
from engine.kv_cache import KVCache


@dataclass
class _Group:
    """Index tensors of one padded group, built once per step."""

    tokens: torch.Tensor  # [T_g] rows of the flattened batch that belong to this group
    req: torch.Tensor  # [T_g] request index within the group (0..B_g-1)
    qi: torch.Tensor  # [T_g] query index within the request
    mask: torch.Tensor  # [B_g, Q_g, S_g] True = attend
    tables: torch.Tensor  # [B_g, nblk_g] block tables covering S_g tokens
    num_queries: int  # Q_g
    num_keys: int  # S_g


class TorchPagedAttention(AttentionBackend):
    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        qsl = meta.query_start_loc.long()  # [B+1]
        q_lens = qsl[1:] - qsl[:-1]  # [B]
        seq_lens = meta.seq_lens.long()  # [B]
        self._groups = [g for g in (self._group(meta, qsl, q_lens, seq_lens, q_lens == 1),
                                    self._group(meta, qsl, q_lens, seq_lens, q_lens > 1)) if g is not None]

    def _group(self, meta: AttentionMetadata, qsl: torch.Tensor, q_lens: torch.Tensor, seq_lens: torch.Tensor,
               select: torch.Tensor) -> _Group | None:
        reqs = torch.nonzero(select).flatten()  # [B_g] request indices of this group
        if reqs.numel() == 0:
            return None
        device = qsl.device
        g_qlens, g_seq = q_lens[reqs], seq_lens[reqs]  # [B_g]
        req = torch.repeat_interleave(torch.arange(len(reqs), device=device), g_qlens)  # [T_g]
        starts = torch.repeat_interleave(qsl[:-1][reqs], g_qlens)  # [T_g]
        offsets = torch.arange(int(g_qlens.sum()), device=device) - torch.repeat_interleave(
            torch.cumsum(g_qlens, 0) - g_qlens, g_qlens)  # [T_g] index within its request
        num_q, num_k = int(g_qlens.max()), int(g_seq.max())
        # Absolute position of each padded query row: where the new tokens start, plus the row index.
        q_pos = (g_seq - g_qlens).unsqueeze(1) + torch.arange(num_q, device=device)  # [B_g, Q_g]
        mask = torch.arange(num_k, device=device).view(1, 1, -1) <= q_pos.unsqueeze(-1)  # [B_g, Q_g, S_g]
        nblk = -(-num_k // self.block_size)
        return _Group(starts + offsets, req, offsets, mask, meta.block_tables[reqs, :nblk].long(), num_q, num_k)

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
        out = torch.empty_like(q)
        for g in self._groups:  # at most two groups: decodes, prefill chunks
            out[g.tokens] = self._attend(g, q[g.tokens], kv_cache.k[layer], kv_cache.v[layer])
        return out

    def _attend(self, g: _Group, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor) -> torch.Tensor:
        """q [T_g, Hq, D]; k_layer, v_layer [num_blocks, Hkv, bs, D] -> [T_g, Hq, D]."""
        B, Q, S = g.tables.shape[0], g.num_queries, g.num_keys
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        G = Hq // Hkv
        # [B, nblk, Hkv, bs, D] -> [B, Hkv, nblk*bs, D] -> first S keys
        kc = k_layer[g.tables].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)[:, :, :S]
        vc = v_layer[g.tables].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)[:, :, :S]
        qp = q.new_zeros(B, Q, Hq, D)  # [B, Q, Hq, D]
        qp[g.req, g.qi] = q
        qp = qp.view(B, Q, Hkv, G, D).permute(0, 2, 3, 1, 4).float()  # [B, Hkv, G, Q, D]
        scores = torch.matmul(qp, kc.float().unsqueeze(2).transpose(-1, -2)) * self.scale  # [B, Hkv, G, Q, S]
        scores = scores.masked_fill(~g.mask.view(B, 1, 1, Q, S), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, vc.float().unsqueeze(2))  # [B, Hkv, G, Q, D]
        out = out.permute(0, 3, 1, 2, 4).reshape(B, Q, Hq, D)  # [B, Q, Hq, D]
        return out[g.req, g.qi].to(q.dtype)  # [T_g, Hq, D]
