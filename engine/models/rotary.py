"""Rotary position embeddings (non-interleaved, "rotate half"), with the llama3 frequency rescaling."""

from __future__ import annotations

import math

import torch

from engine.model_config import RopeConfig
from engine.models import fused_ops


def inv_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:  # -> [head_dim // 2] float32
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type != "llama3":
        return inv_freq
    # llama3: keep high frequencies, divide low ones by `factor`, blend linearly in between (by wavelength).
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    blend = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - blend) * scaled / rope.factor + blend * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, blended, scaled)


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by position; `apply` rotates q and k in place of HF's per-call math."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        inv_freq = inv_frequencies(head_dim, rope)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos().to(dtype=dtype, device=device)  # [P, D]
        self.sin = emb.sin().to(dtype=dtype, device=device)  # [P, D]

    def apply(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, Hq, D]; k [T, Hkv, D] -> rotated q, k (on CUDA rotated in place, else new
        tensors)."""
        if fused_ops.enabled(q):
            fused_ops.rope_(positions, q, k, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)  # [T, 1, D]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
