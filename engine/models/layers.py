"""Tensor-parallel building blocks. Each parameter carries a `weight_loader(param, loaded, shard_id)` that
copies this rank's slice of a checkpoint tensor into it, so checkpoint loading never needs the full model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models import fused_ops, skinny_gemm
from engine.parallel import all_gather_last_dim, all_reduce, tp


def _set_loader(param: nn.Parameter, loader: object) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class MergedColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's rows split over ranks; several logical weights (q/k/v, gate/up) are stacked in
    one matrix so one matmul serves them. `output_sizes` are the full (unsharded) row counts of each.

    `replicas[i]` (default 1) ranks share one slice of weight i: its rows are cut into size / replicas slices
    and rank r holds slice r // replicas[i]. K and V use it when the TP size exceeds the KV heads
    (engine/kv_heads.py): every rank then holds the whole rows of its one KV head, a copy of its neighbours'."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype,
                 replicas: list[int] | None = None) -> None:
        super().__init__()
        g = tp()
        self.replicas = replicas or [1] * len(output_sizes)
        assert len(self.replicas) == len(output_sizes) and all(g.size % r == 0 for r in self.replicas)
        self.local_sizes = [s // (g.size // r) for s, r in zip(output_sizes, self.replicas, strict=True)]
        out = sum(self.local_sizes)
        self.weight = _set_loader(nn.Parameter(torch.empty(out, in_features, dtype=dtype), False), self._load)
        self.bias = (
            _set_loader(nn.Parameter(torch.empty(out, dtype=dtype), False), self._load) if bias else None
        )

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        part = loaded.narrow(0, (tp().rank // self.replicas[shard_id]) * size, size)
        param.data.narrow(0, offset, size).copy_(part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out_local]
        return skinny_gemm.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's columns (the input features) split over ranks, summed by an all-reduce. A layer whose
    input is always silu(gate) * up (`gated_input`, the MLP's down projection) takes [gate | up] in
    `forward_gated`, so the activation can be fused into the GEMM's input loads."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, gated_input: bool = False) -> None:
        super().__init__()
        self.gated_input = gated_input
        self.local_in = in_features // tp().size
        self.weight = _set_loader(
            nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype), False), self._load
        )

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        param.data.copy_(loaded.narrow(1, tp().rank * self.local_in, self.local_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in_local] -> [T, out]
        return all_reduce(skinny_gemm.linear(x, self.weight))

    def forward_gated(self, x: torch.Tensor) -> torch.Tensor:  # [T, 2 * in_local] = [gate | up] -> [T, out]
        y = skinny_gemm.gated_linear(x, self.weight)
        return all_reduce(y if y is not None else skinny_gemm.linear(silu_and_mul(x), self.weight))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks (the vocab padded up to a multiple of the TP size)."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        g = tp()
        self.vocab_size = vocab_size
        self.local_vocab = -(-vocab_size // g.size)
        self.start = g.rank * self.local_vocab
        self.weight = _set_loader(
            nn.Parameter(torch.zeros(self.local_vocab, dim, dtype=dtype), False), self._load
        )

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        end = min(self.start + self.local_vocab, self.vocab_size)
        if end > self.start:
            param.data[: end - self.start].copy_(loaded[self.start : end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        if tp().size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [N, dim] -> [N, vocab]
        return all_gather_last_dim(skinny_gemm.linear(h, self.weight))[:, : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _set_loader(nn.Parameter(torch.ones(dim, dtype=dtype), False), _copy_loader)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, dim] -> normalised [T, dim]. With `residual` [T, dim]: first residual += x (in place), then
        normalise the sum (the decoder's add-then-norm, fused on CUDA)."""
        if fused_ops.enabled(x):
            return fused_ops.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = residual.add_(x)
        # NOTE: statistics in float32, then cast back before the weight: this matches the HF reference bit
        # for bit in float32 and within rounding in half precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _copy_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
    param.data.copy_(loaded)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    if fused_ops.enabled(x):
        return fused_ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
