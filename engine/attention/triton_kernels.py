"""Triton kernels over the paged KV cache: the K/V store (alone, or with the rotary embedding of q and k fused
in), and one causal attention kernel for any batch.

The attention kernel serves decodes, prefill chunks and mixed batches alike ("num_computed_tokens of
num_tokens": a decode is a sequence whose query is one token long). One program owns one KV head of one
sequence and a tile of that sequence's query tokens; the GROUP query heads that share the KV head are packed
into the tile's rows, so each K/V tile is loaded once for all of them (GQA costs no extra KV reads).

    rows of a tile:  m = token_in_tile * GROUP + head_in_group      (BLOCK_M rows, BLOCK_M // GROUP tokens)

Keys are walked in tiles of BLOCK_N, each gathered through the block table (BLOCK_N spans several pages).
Keys every row of the tile may see are processed without a mask; only the tail, where causality cuts in,
pays for masking. Softmax is the online (flash) form in float32 with exp2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_kv_kernel(
    k_ptr, v_ptr,  # [T, Hkv, D] this step's keys and values
    kc_ptr, vc_ptr,  # one layer's K and V views of the cache: [num_blocks, Hkv, block_size, D] (strided)
    slot_ptr,  # [T] int64: block_id * block_size + offset; negative = padding row, not stored
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cs,
    NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_PDL: tl.constexpr,
):
    t = tl.program_id(0)
    if USE_PDL:  # engine/pdl.py's contract: nothing is read or written before the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    ok = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)  # [BLOCK_H, BLOCK_D]
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)  # [BLOCK_H, BLOCK_D]
    dst = blk * stride_cb + off * stride_cs + h[:, None] * stride_ch + d[None, :]
    tl.store(kc_ptr + dst, k, mask=ok)
    tl.store(vc_ptr + dst, v, mask=ok)


@triton.jit
def rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, Hq, D], [T, Hkv, D], [T, Hkv, D] this step's queries, keys and values
    kc_ptr, vc_ptr,  # one layer's K and V views of the cache: [num_blocks, Hkv, block_size, D] (strided)
    slot_ptr,  # [T] int64: block_id * block_size + offset; negative = padding row, not stored
    pos_ptr,  # [T] int64 positions
    cos_ptr, sin_ptr,  # [P, D] rotary tables (the two halves of a row are equal)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch, stride_cs, stride_c,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, USE_PDL: tl.constexpr, WRITE_K: tl.constexpr,
):
    """Rotary embedding ("rotate half", float32, rounded once) of token t's queries in place and of its keys on
    their way into the cache, plus the value store: the RoPE and K/V-store kernels of a layer in one. The keys
    in `k_ptr` stay unrotated (attention reads them from the cache), unless WRITE_K: then they are rotated in
    place too, for an attention that reads this step's K/V contiguous (a fresh prompt's dense prefill)."""
    t = tl.program_id(0).to(tl.int64)
    if USE_PDL:  # engine/pdl.py's contract: nothing is read or written before the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pos = tl.load(pos_ptr + t)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    c = tl.load(cos_ptr + pos * stride_c + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_HALF]
    s = tl.load(sin_ptr + pos * stride_c + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    hq = tl.arange(0, BLOCK_HQ)
    q_ok = (hq[:, None] < NUM_Q) & j_ok[None, :]
    qp = q_ptr + t * stride_qt + hq[:, None] * stride_qh + j[None, :]  # [BLOCK_HQ, BLOCK_HALF] first halves
    q1 = tl.load(qp, mask=q_ok, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=q_ok, other=0.0).to(tl.float32)
    tl.store(qp, (q1 * c - q2 * s).to(q_ptr.dtype.element_ty), mask=q_ok)
    tl.store(qp + HALF, (q2 * c + q1 * s).to(q_ptr.dtype.element_ty), mask=q_ok)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        h = tl.arange(0, BLOCK_HKV)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + h[:, None] * stride_ch
        k_ok = (h[:, None] < NUM_KV) & j_ok[None, :]
        kp = k_ptr + t * stride_kt + h[:, None] * stride_kh + j[None, :]  # [BLOCK_HKV, BLOCK_HALF]
        k1 = tl.load(kp, mask=k_ok, other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=k_ok, other=0.0).to(tl.float32)
        tl.store(kc_ptr + dst + j[None, :], (k1 * c - k2 * s).to(kc_ptr.dtype.element_ty), mask=k_ok)
        tl.store(kc_ptr + dst + HALF + j[None, :], (k2 * c + k1 * s).to(kc_ptr.dtype.element_ty), mask=k_ok)
        if WRITE_K:
            tl.store(kp, (k1 * c - k2 * s).to(k_ptr.dtype.element_ty), mask=k_ok)
            tl.store(kp + HALF, (k2 * c + k1 * s).to(k_ptr.dtype.element_ty), mask=k_ok)
        d = tl.arange(0, BLOCK_D)
        v_ok = (h[:, None] < NUM_KV) & (d[None, :] < HEAD_DIM)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=v_ok)  # [BLOCK_HKV, BLOCK_D]
        tl.store(vc_ptr + dst + d[None, :], v, mask=v_ok)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, kc_ptr, vc_ptr, table_row_ptr, kv_head_off, start, kv_end, pos, d, d_ok,
    stride_cb, stride_cs, scale_log2,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    if MASKED:
        n_ok = n < kv_end
        page = tl.load(table_row_ptr + n // BLOCK_SIZE, mask=n_ok, other=0)  # [BLOCK_N]
    else:
        page = tl.load(table_row_ptr + n // BLOCK_SIZE)  # [BLOCK_N]
    row = page.to(tl.int64) * stride_cb + kv_head_off + (n % BLOCK_SIZE) * stride_cs  # [BLOCK_N]
    if MASKED:
        kt = tl.load(kc_ptr + row[None, :] + d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        kt = tl.load(kc_ptr + row[None, :] + d[:, None], mask=d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(vc_ptr + row[:, None] + d[None, :], mask=d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N], in log2 units
    if MASKED:
        s = tl.where((n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_new)  # [BLOCK_M]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_keys(
    q, kc_ptr, vc_ptr, table_row_ptr, kv_head_off, lo, n_full, end, pos, d, d_ok,
    stride_cb, stride_cs, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax of q over keys lo..end-1: unmasked tiles up to n_full, then masked ones (the causal edge
    and the end). Returns (acc [BLOCK_M, BLOCK_D] unnormalised, running max m_i, running sum l_i)."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # NOTE: a finite floor instead of -inf: exp2(m_i - m_new) is then 0, never NaN, on the first tile.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(lo, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kc_ptr, vc_ptr, table_row_ptr, kv_head_off, start, end,
                                     pos, d, d_ok, stride_cb, stride_cs, scale_log2, BLOCK_N, BLOCK_SIZE,
                                     MASKED=False, PRECISION=PRECISION)
    for start in range(n_full, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, kc_ptr, vc_ptr, table_row_ptr, kv_head_off, start, end,
                                     pos, d, d_ok, stride_cb, stride_cs, scale_log2, BLOCK_N, BLOCK_SIZE,
                                     MASKED=True, PRECISION=PRECISION)
    return acc, m_i, l_i


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [T, Hq, D]
    q_ptr,  # [T, Hq, D]
    kc_ptr, vc_ptr,  # one layer's K and V views of the cache: [num_blocks, Hkv, block_size, D] (strided)
    tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32: context length including this step's tokens (0 = padding row)
    qsl_ptr,  # [B + 1] int32: query_start_loc
    scale_log2,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ch, stride_cs, stride_tb,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 caches (exact fp32, as the reference), else "tf32" (unused)
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    if USE_PDL:  # engine/pdl.py's contract: nothing is read or written before the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    TOKENS: tl.constexpr = BLOCK_M // GROUP  # query tokens per tile
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    tok0 = tile * TOKENS
    if tok0 >= q_len:
        return
    ctx0 = tl.load(seq_lens_ptr + b) - q_len  # absolute position of the first query token

    m = tl.arange(0, BLOCK_M)
    tok = tok0 + m // GROUP  # [BLOCK_M]
    head = kvh * GROUP + m % GROUP  # [BLOCK_M]
    row_ok = (m < TOKENS * GROUP) & (tok < q_len)  # [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    pos = ctx0 + tok  # [BLOCK_M] each row's absolute position: it sees keys 0..pos

    table_row_ptr = tables_ptr + b.to(tl.int64) * stride_tb
    kv_end = ctx0 + tl.minimum(tok0 + TOKENS, q_len)  # one past the last key any row of the tile sees
    # Keys 0..ctx0+tok0 are visible to every row: no mask until the causal edge.
    n_full = ((ctx0 + tok0 + 1) // BLOCK_N) * BLOCK_N
    acc, _, l_i = _attend_keys(q, kc_ptr, vc_ptr, table_row_ptr, kvh.to(tl.int64) * stride_ch, 0, n_full, kv_end,
                                 pos, d, d_ok, stride_cb, stride_cs, scale_log2, BLOCK_M, BLOCK_D, BLOCK_N,
                                 BLOCK_SIZE, PRECISION)
    l_i = tl.where(l_i > 0, l_i, 1.0)  # padding rows (seq_len 0) saw no key
    o_off = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def paged_decode_split_kernel(
    part_acc_ptr,  # [B, SPLITS, Hq, D] float32: unnormalised partial outputs
    part_ml_ptr,  # [B, SPLITS, Hq, 2] float32: running max (log2 units) and sum of each split
    q_ptr,  # [B, Hq, D]: one query token per sequence
    kc_ptr, vc_ptr, tables_ptr, seq_lens_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_cb, stride_ch, stride_cs, stride_tb,
    GROUP: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Decode attention with the context split over SPLITS programs per (sequence, KV head): at small batch
    sizes one program per KV head would leave most of the GPU idle. `reduce_splits_kernel` combines them."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    kvh = tl.program_id(2)
    if USE_PDL:  # engine/pdl.py's contract: nothing is read or written before the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.maximum(tl.minimum(lo + chunk, seq_len), lo)  # an empty split has hi == lo
    m = tl.arange(0, BLOCK_M)
    g = m % GROUP
    row_ok = m < GROUP
    head = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    pos = tl.zeros([BLOCK_M], dtype=tl.int32) + seq_len - 1  # the query is the last token: sees every key
    table_row_ptr = tables_ptr + b.to(tl.int64) * stride_tb
    n_full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attend_keys(q, kc_ptr, vc_ptr, table_row_ptr, kvh.to(tl.int64) * stride_ch, lo, n_full, hi,
                                 pos, d, d_ok, stride_cb, stride_cs, scale_log2, BLOCK_M, BLOCK_D, BLOCK_N,
                                 BLOCK_SIZE, PRECISION)
    base = (b.to(tl.int64) * SPLITS + split) * NUM_HEADS + head  # [BLOCK_M]
    tl.store(part_acc_ptr + base[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(part_ml_ptr + base * 2, m_i, mask=row_ok)
    tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=row_ok)


@triton.jit
def reduce_splits_kernel(
    out_ptr,  # [B, Hq, D]
    part_acc_ptr, part_ml_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if USE_PDL:  # engine/pdl.py's contract: nothing is read or written before the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    base = (b * SPLITS + s) * NUM_HEADS + h  # [SPLITS]
    m_s = tl.load(part_ml_ptr + base * 2)  # [SPLITS]
    l_s = tl.load(part_ml_ptr + base * 2 + 1)
    w = tl.exp2(m_s - tl.max(m_s, 0))  # [SPLITS]; an empty split has l = 0 and acc = 0
    acc = tl.load(part_acc_ptr + base[:, None] * HEAD_DIM + d[None, :], mask=d_ok[None, :], other=0.0)
    num = tl.sum(acc * w[:, None], 0)  # [BLOCK_D]
    den = tl.sum(l_s * w, 0)
    den = tl.where(den > 0, den, 1.0)  # padding rows saw no key
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, (num / den).to(out_ptr.dtype.element_ty), mask=d_ok)
