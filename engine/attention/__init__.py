"""Attention backends over the paged KV cache; `select_backend` resolves the configured name ("auto" or one of
BACKENDS) for a device and cache shape."""

from __future__ import annotations

import importlib.util
import logging

import torch

from engine import envs
from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.attention.torch_ref import TorchPagedAttention
from engine.metrics import count_fallback

log = logging.getLogger(__name__)

BACKEND_NAMES = ("torch", "triton", "flash-attn")


def _triton_unusable(device: str) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device != "cuda" and not envs.TRITON_INTERPRET.get():
        return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    return None


def select_backend(name: str, device: str, block_size: int, head_dim: int,
                   dtype: torch.dtype = torch.bfloat16) -> type[AttentionBackend]:
    """The backend class for `attention_backend`. "auto": flash-attn if installed and the block size suits it,
    else Triton on CUDA, else the PyTorch reference. An explicit name that cannot run raises ValueError."""
    from engine.attention.flash_attn_backend import FlashAttnPagedAttention

    if name not in (*BACKEND_NAMES, "auto"):
        raise ValueError(f"attention_backend: {name!r} is not one of {list(BACKEND_NAMES)} or 'auto'")
    if name == "auto":
        if device != "cuda":
            return TorchPagedAttention
        if FlashAttnPagedAttention.supports(device, dtype, block_size, head_dim) is None:
            return FlashAttnPagedAttention
        why = _triton_unusable(device)
        if why is None:
            from engine.attention.triton_backend import TritonPagedAttention

            return TritonPagedAttention
        count_fallback("attention_auto_fallback_to_torch")
        log.warning("attention_backend auto: using the PyTorch reference on CUDA because %s", why)
        return TorchPagedAttention
    if name == "torch":
        return TorchPagedAttention
    if name == "flash-attn":
        why = FlashAttnPagedAttention.supports(device, dtype, block_size, head_dim)
        if why is not None:
            raise ValueError(f"attention_backend: flash-attn cannot run here: {why}")
        return FlashAttnPagedAttention
    why = _triton_unusable(device)
    if why is not None:
        raise ValueError(f"attention_backend: triton cannot run here: {why}")
    from engine.attention.triton_backend import TritonPagedAttention

    return TritonPagedAttention


__all__ = ["BACKEND_NAMES", "AttentionBackend", "AttentionMetadata", "select_backend"]
