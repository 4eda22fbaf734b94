"""Attention backends over the paged KV cache; `get_backend` picks one by name."""

from __future__ import annotations

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.attention.torch_ref import TorchPagedAttention

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchPagedAttention}


def get_backend(name: str, device: str) -> type[AttentionBackend]:
    """Resolve `attention_backend` ("auto" or a name). GPU kernels register here in a later change."""
    if name == "auto":
        name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: {name!r} is not one of {sorted(BACKENDS)} or 'auto'")
    return BACKENDS[name]


__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "get_backend"]
