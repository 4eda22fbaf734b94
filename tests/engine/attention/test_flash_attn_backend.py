"""The flash-attn backend names what it cannot serve (not installed, CPU, float32, block size), and selecting it
where it cannot run fails with that reason."""

from __future__ import annotations

import pytest
import torch

from engine.attention import select_backend
from engine.attention.flash_attn_backend import FlashAttnPagedAttention, flash_attn_available


def test_flash_attn_refuses_what_it_cannot_serve() -> None:
    why = FlashAttnPagedAttention.supports("cuda", torch.bfloat16, 16, 128)
    assert why is not None
    assert ("not installed" in why) if not flash_attn_available() else ("block_size % 256" in why)
    assert "CUDA device" in (FlashAttnPagedAttention.supports("cpu", torch.bfloat16, 256, 128) or "")
    assert "float16 or bfloat16" in (FlashAttnPagedAttention.supports("cuda", torch.float32, 256, 128) or "")
    with pytest.raises(ValueError, match="flash-attn cannot run here"):
        select_backend("flash-attn", "cuda", 16, 128)
