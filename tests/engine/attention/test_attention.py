"""select_backend (engine/attention/__init__.py): "auto" picks the reference on CPU; explicit names that cannot run
here fail with the reason."""

from __future__ import annotations

import pytest
import torch

from engine.attention import select_backend
from engine.attention.torch_ref import TorchPagedAttention


def test_auto_on_cpu_is_the_reference() -> None:
    assert select_backend("auto", "cpu", 16, 64) is TorchPagedAttention
    assert select_backend("torch", "cpu", 16, 64) is TorchPagedAttention


def test_unknown_name_is_refused() -> None:
    with pytest.raises(ValueError, match="attention_backend: 'paged' is not one of"):
        select_backend("paged", "cpu", 16, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_on_cpu_names_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton cannot run here"):
        select_backend("triton", "cpu", 16, 64)
