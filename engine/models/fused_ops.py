"""Fused elementwise kernels for CUDA (Triton): residual-add + RMSNorm, rotary embedding in place, SiLU-and-mul.

Each replaces several PyTorch kernels (RMSNorm alone is seven: cast, pow, mean, add, rsqrt, mul, cast, mul) with
one pass over memory. RMSNorm keeps the reference's rounding points (the residual sum is rounded to the model
dtype before it is normalised; statistics are float32). RoPE computes in float32 and rounds once, where the
reference rounds after each multiply and add, so half-precision results differ by rounding. The PyTorch
versions in layers.py / rotary.py remain the reference and the CPU path; `enabled(x)` says which one a tensor
gets.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from engine import envs, pdl
from engine.metrics import count_fallback

log = logging.getLogger(__name__)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
# NOTE: opt-out for A/B measurements (PDSERVE_FUSED_OPS=0), not a correctness switch; read once at import.
_WANTED = envs.PDSERVE_FUSED_OPS.get()
_warned = False

if _HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
                             N: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr, USE_PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if USE_PDL:  # engine/pdl.py's contract: nothing is read or written before the wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        i = tl.arange(0, BLOCK)
        ok = i < N
        x = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + i, mask=ok, other=0.0).to(tl.float32))
            x = x.to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * stride_r + i, x, mask=ok)  # the new residual stream
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
        w = tl.load(w_ptr + i, mask=ok)
        tl.store(out_ptr + row * stride_o + i, w * (xf * inv).to(w.dtype), mask=ok)

    @triton.jit
    def _rotate_heads(base, t, stride_t, stride_h, n, c, s, h, j, jok, HALF: tl.constexpr):
        ok = (h[:, None] < n) & jok[None, :]
        p = base + t * stride_t + h[:, None] * stride_h + j[None, :]  # [BLOCK_H, BLOCK_HALF]: first halves
        x1 = tl.load(p, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(p + HALF, mask=ok, other=0.0).to(tl.float32)
        tl.store(p, (x1 * c[None, :] - x2 * s[None, :]).to(base.dtype.element_ty), mask=ok)
        tl.store(p + HALF, (x2 * c[None, :] + x1 * s[None, :]).to(base.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                     stride_c, NUM_Q: tl.constexpr, NUM_K: tl.constexpr, BLOCK_H: tl.constexpr,
                     HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        if USE_PDL:  # engine/pdl.py's contract: nothing is read or written before the wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pos = tl.load(pos_ptr + t)
        j = tl.arange(0, BLOCK_HALF)
        jok = j < HALF
        c = tl.load(cos_ptr + pos * stride_c + j, mask=jok, other=0.0).to(tl.float32)  # [BLOCK_HALF]
        s = tl.load(sin_ptr + pos * stride_c + j, mask=jok, other=0.0).to(tl.float32)
        h = tl.arange(0, BLOCK_H)
        _rotate_heads(q_ptr, t, stride_qt, stride_qh, NUM_Q, c, s, h, j, jok, HALF)
        _rotate_heads(k_ptr, t, stride_kt, stride_kh, NUM_K, c, s, h, j, jok, HALF)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N: tl.constexpr, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if USE_PDL:  # engine/pdl.py's contract: nothing is read or written before the wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        gate = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + N + i, mask=ok, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # silu, rounded as F.silu's output is
        tl.store(out_ptr + row * stride_o + i, act * up, mask=ok)


def enabled(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    if not _HAS_TRITON:
        # NOTE: counted per call (how much work took the slow path), logged once per process.
        global _warned
        if not _warned:
            _warned = True
            log.warning("triton is not installed: the fused CUDA kernels fall back to the PyTorch reference ops")
        count_fallback("fused_ops_cuda_without_triton")
        return False
    return _WANTED


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x [T, N] (+ residual [T, N], updated in place to x + residual) -> normalised [T, N]."""
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(x.shape[0],)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), eps,
                                        N=x.shape[1], BLOCK=_pow2(x.shape[1]), HAS_RES=residual is not None,
                                        USE_PDL=pdl.enabled(), num_warps=8 if x.shape[1] >= 4096 else 4,
                                        **pdl.launch_kwargs())
    return out


def rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place ("rotate half"); cos/sin [P, D] tables (halves equal)."""
    heads, half = max(q.shape[1], k.shape[1]), q.shape[2] // 2
    _rope_kernel[(q.shape[0],)](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                cos.stride(0), NUM_Q=q.shape[1], NUM_K=k.shape[1], BLOCK_H=_pow2(heads),
                                HALF=half, BLOCK_HALF=_pow2(half), USE_PDL=pdl.enabled(), **pdl.launch_kwargs())


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    n = x.shape[1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), N=n, BLOCK=block,
                                                                   USE_PDL=pdl.enabled(), **pdl.launch_kwargs())
    return out
