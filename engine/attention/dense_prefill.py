"""Causal attention of one fresh prompt with PyTorch's fused SDPA (the Triton backend's dense prefill path), its
length optionally padded up to a multiple of a bucket.

NOTE: why buckets. SDPA's cuDNN engine builds an execution plan for every new shape (reported at tens of ms a
shape, and ~1 s when a new kernel variant compiles), and a prefill instance meets a new prompt length at nearly
every step. Padded lengths repeat, so each bucket's plan is built once (by the engine's warm-up when it is on:
engine/warmup.py). Padding at the end leaves causal attention's result as it was: a real query row attends only to
keys at or before its own position, all of them real, and the padded rows' outputs are dropped; only the kernel's
rounding may differ (a longer sequence may be tiled differently). On by default at 256 tokens
(`PDSERVE_DENSE_PREFILL_BUCKET`, engine/envs.py): on an H200 a new exact length cost 1.35x a seen one and a padded
one 1.01x (bench/prefill_shape_cost.py, docs/performance.md, "Dense prefill padded to
256-token buckets").

This module imports only torch, so its arithmetic is tested on CPU (tests/engine/attention/test_dense_prefill_math.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DENSE_DTYPES = (torch.bfloat16, torch.float16)  # SDPA's fused kernels; float32 steps stay on the paged kernel
DENSE_PREFILL_MIN_TOKENS = 256  # below this a prompt's attention is a sliver of its step: not worth the switch


def padded_len(tokens: int, bucket: int) -> int:
    """`tokens` rounded up to a multiple of `bucket` (0: unchanged)."""
    if bucket < 0:
        raise ValueError(f"bucket: {bucket} must be >= 0")
    return -(-tokens // bucket) * bucket if bucket else tokens


def bucket_lengths(bucket: int, limit: int) -> list[int]:
    """The padded lengths a dense step can have when its prompt has at most `limit` tokens: the plans a warm-up
    builds. The last one may exceed `limit` (a prompt of `limit` tokens padded up)."""
    if bucket <= 0:
        return []
    first = padded_len(DENSE_PREFILL_MIN_TOKENS, bucket)
    return list(range(first, padded_len(limit, bucket) + 1, bucket))


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, gqa: bool,
                           bucket: int = 0) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] (any row strides) -> [T, Hq, D] in q's memory order: causal SDPA on
    [1, H, T', D] views, T' = T padded up to a multiple of `bucket` (0: T)."""
    t = q.shape[0]
    p = padded_len(t, bucket)
    if p != t:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, p - t)) for x in (q, k, v))  # [P, H, D]: zero rows at the end
    elif bucket:
        # NOTE: the plan is keyed on the strides too: a prompt whose length is already a multiple of the bucket
        # (the warm-up's) must reach SDPA in the padded copies' contiguous layout, or the first padded prompt of
        # each bucket builds a second plan while serving (an H200 in the 8B shape: 93 ms instead of 24 ms of host
        # time in its first step, docs/performance.md)
        q, k, v = (x.contiguous() for x in (q, k, v))  # [P, H, D]
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                         v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
                                         enable_gqa=gqa)  # [1, Hq, P, D]
    return out.squeeze(0).transpose(0, 1)[:t]  # [T, Hq, D]
