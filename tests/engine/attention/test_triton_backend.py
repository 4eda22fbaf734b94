"""The Triton paged-attention kernels against the pure-PyTorch reference, on random batches that mix decodes,
prefill chunks over a cached context, and fresh prefills. Fresh random inputs every run (the seed is printed on
failure). Runs on a GPU, or on CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.attention.torch_ref import TorchPagedAttention
from engine.kv_cache import KVCache, KVLayout

pytestmark = [pytest.mark.gpu, pytest.mark.interpretable]

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _batch(gen: torch.Generator, q_lens: list[int], ctx_lens: list[int], num_blocks: int, bs: int,
           device: str) -> tuple[AttentionMetadata, int]:
    """Random block tables (distinct blocks, shuffled) for sequences of ctx + q tokens; returns (meta, T)."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    need = [-(-s // bs) for s in seq_lens]
    perm = torch.randperm(num_blocks, generator=gen)[: sum(need)]
    max_blocks = max(need)
    tables = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32)  # [B, max_blocks]
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at : at + n]
        at += n
    slots = []
    for i, (c, s) in enumerate(zip(ctx_lens, seq_lens, strict=True)):
        pos = torch.arange(c, s)
        slots.append(tables[i, pos // bs].long() * bs + pos % bs)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device), query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=tables.to(device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
    )
    return meta, int(qsl[-1])


SHAPES = [
    # (Hq, Hkv, D, block_size, q_lens, ctx_lens)
    (8, 2, 64, 16, [1, 1, 1, 1], [0, 15, 16, 300]),  # decodes only
    (32, 8, 128, 16, [1, 37, 200, 1, 5], [63, 0, 90, 1000, 17]),  # mixed: decodes, chunks with context, fresh
    (12, 4, 128, 32, [129, 1, 64], [0, 77, 64]),  # GROUP 3 (not a power of two), larger pages
    (4, 4, 80, 16, [17, 1], [40, 130]),  # MHA, head_dim not a power of two
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])
def test_triton_matches_reference(shape: tuple, dtype: torch.dtype) -> None:
    _check(shape, dtype)


@pytest.mark.parametrize(("num_sms", "splits"), [(1, 1), (48, 4), (132, 16)])
def test_decode_split_counts(num_sms: int, splits: int) -> None:
    """Decode-only batches (3 sequences x 8 KV heads = 24 programs, 2 wanted per SM) at split counts 1 (no
    split), 4 and 16 (the cap)."""
    from engine.attention.triton_backend import TritonPagedAttention

    tri = TritonPagedAttention(32, 8, 128, 128**-0.5, 16)
    tri.num_sms = num_sms
    assert tri.decode_splits(3) == splits
    _check((32, 8, 128, 16, [1] * 3, [1, 700, 4000]), torch.float16, num_sms)


def _check(shape: tuple, dtype: torch.dtype, num_sms: int | None = None) -> None:
    from engine.attention.triton_backend import TritonPagedAttention

    Hq, Hkv, D, bs, q_lens, ctx_lens = shape
    device = _device()
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 tl.dot wrongly (checked with a 16x16 dot)")
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    num_blocks, layers = 512, 2
    layout = KVLayout(num_blocks, Hkv, layers, bs, D, torch.empty((), dtype=dtype).element_size())
    ref_cache = KVCache(layout, dtype, device)
    ref_cache.tensor.copy_(torch.randn(ref_cache.tensor.shape, generator=gen).to(dtype))  # cached context
    tri_cache = KVCache(layout, dtype, device)
    tri_cache.tensor.copy_(ref_cache.tensor)
    meta, T = _batch(gen, q_lens, ctx_lens, num_blocks, bs, device)
    ref = TorchPagedAttention(Hq, Hkv, D, D**-0.5, bs)
    tri = TritonPagedAttention(Hq, Hkv, D, D**-0.5, bs)
    if num_sms is not None:
        tri.num_sms = num_sms
    ref.prepare(meta)
    tri.prepare(meta)
    for layer in range(layers):
        q = torch.randn(T, Hq, D, generator=gen).to(device, dtype)  # [T, Hq, D]
        kv = torch.randn(T, 2 * Hkv, D, generator=gen).to(device, dtype)  # [T, 2*Hkv, D]
        k, v = kv[:, :Hkv], kv[:, Hkv:]  # strided views, as the model passes them
        want = ref.forward(layer, q, k, v, ref_cache, meta)  # [T, Hq, D]
        got = tri.forward(layer, q, k, v, tri_cache, meta)  # [T, Hq, D]
        err = (got.float() - want.float()).abs().max().item()
        assert err <= TOL[dtype], f"seed {seed}, layer {layer}: max abs error {err}"
    assert torch.equal(tri_cache.tensor, ref_cache.tensor), f"seed {seed}: the stored K/V differ"


def test_padding_rows_store_nothing_and_stay_finite() -> None:
    """CUDA-graph padding: rows with slot -1 and seq_len 0 write no K/V and leave other rows untouched."""
    from engine.attention.triton_backend import TritonPagedAttention

    device, dtype = _device(), torch.bfloat16
    layout = KVLayout(64, 2, 1, 16, 64, 2)
    cache = KVCache(layout, dtype, device)
    meta, _ = _batch(torch.Generator().manual_seed(0), [1, 1], [10, 20], 64, 16, device)
    # Two real decodes, then two padding rows.
    padded = AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.full((2,), -1, device=device)]),
        query_start_loc=torch.arange(5, dtype=torch.int32, device=device),
        seq_lens=torch.cat([meta.seq_lens, torch.zeros(2, dtype=torch.int32, device=device)]),
        block_tables=torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables)]),
        max_query_len=1, max_seq_len=int(meta.max_seq_len),
    )
    tri = TritonPagedAttention(8, 2, 64, 0.125, 16)
    q = torch.randn(4, 8, 64, device=device, dtype=dtype)
    k = torch.randn(4, 2, 64, device=device, dtype=dtype)
    tri.prepare(padded)
    out = tri.forward(0, q, k, k, cache, padded)
    written = (cache.tensor != 0).any(dim=(0, 2, 3, 4, 5, 6)).nonzero().flatten().tolist()
    assert sorted(written) == sorted(set((meta.slot_mapping // 16).tolist()))
    tri.prepare(meta)
    assert torch.equal(out[:2], tri.forward(0, q[:2], k[:2], k[:2], cache, meta))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rope_store_equals_rope_then_store(dtype: torch.dtype) -> None:
    """The fused RoPE + K/V store kernel against the two kernels it replaces (fused_ops.rope_, store_kv): q
    rotated in place, rotated keys and the values at their slots, padding rows (slot -1) store nothing, k
    itself left unrotated."""
    from engine.attention.triton_backend import rope_store_kv, store_kv
    from engine.model_config import RopeConfig
    from engine.models import fused_ops
    from engine.models.rotary import RotaryEmbedding

    device, Hq, Hkv, D, bs = _device(), 12, 4, 128, 16
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    meta, T = _batch(gen, [1, 7, 1], [30, 0, 100], 64, bs, device)
    meta.slot_mapping[1] = -1  # a padding row in the middle
    rope = RotaryEmbedding(D, 4096, RopeConfig(theta=500000.0), dtype, device)
    positions = torch.randint(0, 4096, (T,), generator=gen).to(device)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen).to(device, dtype)  # [T, (Hq + 2 Hkv) D], the model's
    layout = KVLayout(64, Hkv, 2, bs, D, torch.empty((), dtype=dtype).element_size())
    want_cache, got_cache = KVCache(layout, dtype, device), KVCache(layout, dtype, device)

    def views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = x[:, : Hq * D].view(T, Hq, D)  # [T, Hq, D]
        k = x[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)  # [T, Hkv, D]
        return q, k, x[:, (Hq + Hkv) * D :].view(T, Hkv, D)

    want_q, want_k, want_v = views(qkv.clone())
    fused_ops.rope_(positions, want_q, want_k, rope.cos, rope.sin)
    store_kv(want_k, want_v, want_cache, 1, meta.slot_mapping)
    got_qkv = qkv.clone()
    got_q, got_k, _ = views(got_qkv)
    rope_store_kv(got_q, got_k, views(got_qkv)[2], got_cache, 1, meta.slot_mapping, positions, rope.cos, rope.sin)
    tol = {torch.float16: 2e-3, torch.float32: 1e-5}[dtype] * 4
    assert (got_q.float() - want_q.float()).abs().max().item() <= tol, f"seed {seed}"
    assert torch.equal(got_qkv[:, Hq * D :], qkv[:, Hq * D :]), f"seed {seed}: k or v was modified"
    assert (got_cache.tensor.float() - want_cache.tensor.float()).abs().max().item() <= tol, f"seed {seed}"
    assert torch.equal(got_cache.v[1], want_cache.v[1]), f"seed {seed}: values must be copied exactly"
    stored = (got_cache.tensor != 0).any(dim=(0, 2, 3, 4, 5, 6)).nonzero().flatten().tolist()
    assert sorted(stored) == sorted({s // bs for s in meta.slot_mapping.tolist() if s >= 0})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_rotary_matches_reference(dtype: torch.dtype) -> None:
    """The backend seam the model calls: Triton's fused forward_rotary against the reference backend's
    (PyTorch RoPE, then forward) on a mixed batch."""
    if _device() == "cpu":
        pytest.skip("forward_rotary fuses only for CUDA tensors (the CPU run takes the reference path)")
    from engine.attention.triton_backend import TritonPagedAttention
    from engine.model_config import RopeConfig
    from engine.models.rotary import RotaryEmbedding

    Hq, Hkv, D, bs, device = 32, 8, 128, 16, "cuda"
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    meta, T = _batch(gen, [1, 37, 1, 5], [63, 0, 1000, 17], 256, bs, device)
    layout = KVLayout(256, Hkv, 1, bs, D, torch.empty((), dtype=dtype).element_size())
    ref_cache, tri_cache = KVCache(layout, dtype, device), KVCache(layout, dtype, device)
    ref_cache.tensor.copy_(torch.randn(ref_cache.tensor.shape, generator=gen).to(dtype))
    tri_cache.tensor.copy_(ref_cache.tensor)
    rope = RotaryEmbedding(D, 4096, RopeConfig(theta=500000.0), dtype, device)
    positions = (meta.seq_lens.repeat_interleave(meta.query_start_loc.diff()) - 1).long()  # [T] last-token-ish
    ref, tri = TorchPagedAttention(Hq, Hkv, D, D**-0.5, bs), TritonPagedAttention(Hq, Hkv, D, D**-0.5, bs)
    ref.prepare(meta)
    tri.prepare(meta)
    q = torch.randn(T, Hq, D, generator=gen).to(device, dtype)  # [T, Hq, D]
    kv = torch.randn(T, 2 * Hkv, D, generator=gen).to(device, dtype)  # [T, 2 Hkv, D]
    want = ref.forward_rotary(0, q.clone(), kv[:, :Hkv].clone(), kv[:, Hkv:].clone(), ref_cache, meta, rope, positions)
    got = tri.forward_rotary(0, q.clone(), kv[:, :Hkv], kv[:, Hkv:], tri_cache, meta, rope, positions)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 2 * TOL[dtype], f"seed {seed}: max abs error {err}"
    assert (tri_cache.tensor.float() - ref_cache.tensor.float()).abs().max().item() <= 4 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotary", [False, True], ids=["forward", "forward_rotary"])
def test_dense_prefill_of_one_fresh_prompt_matches_reference(dtype: torch.dtype, rotary: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One fresh prompt (no cached context, >= DENSE_PREFILL_MIN_TOKENS) attends with SDPA over its contiguous
    K/V: same output and same stored K/V as the reference; with a cached context, or PDSERVE_DENSE_PREFILL=0, the
    paged kernel runs instead."""
    if rotary and _device() == "cpu":
        pytest.skip("forward_rotary fuses only for CUDA tensors (the CPU run takes the reference path)")
    if _device() == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 tl.dot wrongly (checked with a 16x16 dot)")
    from engine.attention.triton_backend import DENSE_PREFILL_MIN_TOKENS, TritonPagedAttention
    from engine.model_config import RopeConfig
    from engine.models.rotary import RotaryEmbedding

    Hq, Hkv, D, bs, device = 32, 8, 128, 16, _device()
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    T = DENSE_PREFILL_MIN_TOKENS + 45
    layout = KVLayout(64, Hkv, 1, bs, D, torch.empty((), dtype=dtype).element_size())
    rope = RotaryEmbedding(D, 4096, RopeConfig(theta=500000.0), dtype, device)
    q = torch.randn(T, Hq, D, generator=gen).to(device, dtype)  # [T, Hq, D]
    kv = torch.randn(T, 2 * Hkv, D, generator=gen).to(device, dtype)  # [T, 2 Hkv, D]
    for ctx, dense_env, dense in ((0, "1", True), (16, "1", False), (0, "0", False)):
        monkeypatch.setenv("PDSERVE_DENSE_PREFILL", dense_env)
        meta, _ = _batch(torch.Generator().manual_seed(seed), [T - ctx], [ctx], 64, bs, device)
        ref_cache, tri_cache = KVCache(layout, dtype, device), KVCache(layout, dtype, device)
        ref = TorchPagedAttention(Hq, Hkv, D, D**-0.5, bs)
        tri = TritonPagedAttention(Hq, Hkv, D, D**-0.5, bs)
        ref.prepare(meta)
        tri.prepare(meta)
        assert tri._dense is dense, (ctx, dense_env)
        qq, kk, vv = q[ctx:].clone(), kv[ctx:, :Hkv].clone(), kv[ctx:, Hkv:].clone()
        if rotary:
            positions = torch.arange(ctx, T, device=device)
            want = ref.forward_rotary(0, qq.clone(), kk.clone(), vv.clone(), ref_cache, meta, rope, positions)
            got = tri.forward_rotary(0, qq.clone(), kk.clone(), vv.clone(), tri_cache, meta, rope, positions)
        else:
            want = ref.forward(0, qq, kk, vv, ref_cache, meta)
            got = tri.forward(0, qq, kk, vv, tri_cache, meta)
        assert got.shape == want.shape == (T - ctx, Hq, D)
        err = (got.float() - want.float()).abs().max().item()
        assert err <= 2 * TOL[dtype], f"seed {seed}, ctx {ctx}: max abs error {err}"
        assert (tri_cache.tensor.float() - ref_cache.tensor.float()).abs().max().item() <= 4 * TOL[dtype]
