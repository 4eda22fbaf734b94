"""The dense prefill path's arithmetic (engine/attention/dense_prefill.py), on CPU: a prompt padded up to a bucket
attends as it does unpadded, because the padding goes after the last real key of a causal attention; only the
kernel's rounding differs (it may tile a longer sequence differently: measured <= 2e-7 in float32, one bf16 ulp
in a few rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention.dense_prefill import (
    DENSE_PREFILL_MIN_TOKENS,
    bucket_lengths,
    dense_causal_attention,
    padded_len,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,bucket", [(100, 64), (128, 64), (301, 256), (37, 0)])
def test_a_padded_prompt_attends_as_the_unpadded_one(dtype: torch.dtype, tokens: int, bucket: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    hq, hkv, d = 8, 2, 32
    # q, k, v as the model hands them over: row-strided views of one fused projection
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(dtype)  # [T, (Hq + 2 Hkv) D]
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(tokens, hkv, d)
    scale = d ** -0.5
    out = dense_causal_attention(q, k, v, scale, True, bucket)  # [T, Hq, D]
    exact = dense_causal_attention(q, k, v, scale, True, 0)
    assert out.shape == (tokens, hq, d) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=1e-6, rtol=0)
    else:  # one bf16 ulp of the value
        torch.testing.assert_close(out.float(), exact.float(), atol=1e-3, rtol=2 ** -7)
    # and both are causal attention: against SDPA with the KV heads repeated, in float32
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.float().repeat_interleave(hq // hkv, 1)
                                         .transpose(0, 1), v.float().repeat_interleave(hq // hkv, 1).transpose(0, 1),
                                         is_causal=True, scale=scale).transpose(0, 1)  # [T, Hq, D]
    torch.testing.assert_close(out.float(), ref, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_padding_at_the_front_would_not_be_exact() -> None:
    """The property the padding relies on: keys after a row's position do not reach it; keys before it do."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 20, 16, generator=g) for _ in range(3))
    base = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    back = F.scaled_dot_product_attention(*(F.pad(x, (0, 0, 0, 5)) for x in (q, k, v)), is_causal=True)
    front = F.scaled_dot_product_attention(*(F.pad(x, (0, 0, 5, 0)) for x in (q, k, v)), is_causal=True)
    # NOTE: equal up to float32 rounding, not bitwise: SDPA's CPU kernel blocks a longer sequence differently on
    # some CPUs (AVX2: a 1-ulp difference from 24 keys on), as GPU kernels may; the padding's exactness is the
    # engine's token-exact tests' to show
    torch.testing.assert_close(back[:, :, :20], base, atol=1e-6, rtol=0)
    assert (front[:, :, 5:] - base).abs().max() > 1e-2


def test_bucket_arithmetic() -> None:
    assert [padded_len(n, 256) for n in (1, 256, 257, 3000)] == [256, 256, 512, 3072]
    assert padded_len(3000, 0) == 3000
    with pytest.raises(ValueError, match="must be >= 0"):
        padded_len(10, -1)
    assert bucket_lengths(0, 8192) == []
    assert bucket_lengths(256, 1024) == [256, 512, 768, 1024]
    assert bucket_lengths(1000, 4000) == [1000, 2000, 3000, 4000] and DENSE_PREFILL_MIN_TOKENS <= 1000
    assert bucket_lengths(100, 1000)[0] == 300  # the first padded length that a dense step (>= 256 tokens) can have
    # a prompt of the limit's 8,191 tokens (max_model_len 8,192) pads to 8,192: that plan is one of them
    assert bucket_lengths(256, 8191)[-1] == 8192 and len(bucket_lengths(256, 8191)) == 32


def test_sdpa_sees_one_layout_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt whose length is a multiple of the bucket (the warm-up runs those) and one padded up to it reach
    SDPA with the same shapes and strides: SDPA's plan is keyed on both, and one built in the warm-up must serve
    the padded prompts too."""
    seen: list[tuple[tuple[int, ...], ...]] = []
    sdpa = F.scaled_dot_product_attention

    def record(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append(tuple(s for x in (q, k, v) for s in (*x.shape, *x.stride())))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    hq, hkv, d = 8, 2, 16
    for tokens in (256, 250, 201):  # exactly one bucket, then two prompts padded up to it
        qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=torch.bfloat16)  # [T, (Hq + 2 Hkv) D]
        q = qkv[:, : hq * d].view(tokens, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].view(tokens, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(tokens, hkv, d)
        dense_causal_attention(q, k, v, d ** -0.5, True, 256)
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2], seen
