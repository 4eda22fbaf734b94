"""Small-batch linear layers on CUDA: a Triton kernel for y = x W^T (+ b) when x has few rows (decode steps),
chosen per (rows, N, K) against cuBLAS by timing both at start-up.

At decode batch sizes a linear layer is a stream over its weight matrix: every byte of W is read once for a
handful of rows of x. cuBLAS's small-M kernels streamed the Llama-3-8B weights at 0.84x of the device copy
bandwidth on an H200 (docs/performance.md). Here every CTA owns a narrow strip of W's rows (BLOCK_N) and walks
K in wide tiles, so there are enough CTAs and bytes in flight to stream W at copy speed. For one row the
product is a multiply-accumulate into a [BLOCK_N, BLOCK_K] register tile, reduced once at the end; for more
rows it is tl.dot with the rows padded to 16, 32 or 64 (the padding costs no memory traffic).

The choice is made by measurement, not assumed: `tune` times cuBLAS and each candidate tile on the model's own
weights (cycling through the layers, as a step does, so L2 does not flatter anyone) inside CUDA graphs (so
launch overhead does not either), and keeps the Triton kernel only where it wins.

The MLP's down projection can also take its input as [gate | up] and apply SiLU-and-mul while loading
(`gated_linear`); that form is tuned too, against the separate SiLU-and-mul kernel followed by `linear`.

Contract: `tune` runs before any CUDA graph capture and before the KV cache is sized (it captures graphs of
its own and allocates scratch outputs). After it, `linear` is capture-safe: its choice depends on shapes only.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import envs, pdl
from engine.metrics import count_fallback
from engine.models import fused_ops

log = logging.getLogger(__name__)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
# NOTE: opt-out for A/B measurements (PDSERVE_SKINNY_GEMM=0), not a correctness switch; read once at import.
_WANTED = envs.PDSERVE_SKINNY_GEMM.get()
MAX_ROWS = 64  # above this many rows a linear layer is no longer a pure weight stream: cuBLAS always

if _HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_x(ptrs, mask, K, GATED: tl.constexpr, MASKED: tl.constexpr):
        """A tile of the layer's input: x itself, or for GATED silu(gate) * up from x = [gate | up] (K each),
        rounded as fused_ops.silu_and_mul rounds. `mask` is ignored unless MASKED."""
        if MASKED:
            first = tl.load(ptrs, mask=mask, other=0.0)
        else:
            first = tl.load(ptrs)
        if GATED:
            if MASKED:
                up = tl.load(ptrs + K, mask=mask, other=0.0)
            else:
                up = tl.load(ptrs + K)
            gate = first.to(tl.float32)
            return (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
        else:
            return first

    @triton.jit
    def skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                           HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                           GATED: tl.constexpr, USE_PDL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[M, N] = x[M, K] @ w[N, K]^T (+ b[N]); with GATED, x is [M, 2K] and the input is silu(x[:, :K]) *
        x[:, K:]. Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)); BLOCK_M == 1 is the one-row (GEMV) form, which
        reads x's row pid_m."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        rk = tl.arange(0, BLOCK_K)  # [BK]
        n_ok = rn < N
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]  # [BN, BK]
        if BLOCK_M == 1:
            x_ptrs = x_ptr + pid_m * stride_xm + rk  # [BK]
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            k_first = 0
            if USE_PDL:
                # NOTE: no earlier kernel writes the weights, so the first tile is loaded before the wait: the
                # stream over W starts while the previous kernel drains (engine/pdl.py).
                k_ok = rk < K
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
                x = _load_x(x_ptrs, k_ok, K, GATED, True)
                acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
                k_first = BLOCK_K
            for k0 in range(k_first, K, BLOCK_K):
                if EVEN_K:
                    w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
                    x = _load_x(x_ptrs, rk, K, GATED, False)
                else:
                    k_ok = (k0 + rk) < K
                    w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    x = _load_x(x_ptrs, k_ok, K, GATED, True)
                acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
            acc = tl.sum(acc2, axis=1)  # [BN]
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + pid_m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
        else:
            if USE_PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
            m_ok = rm < M
            x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]  # [BM, BK]
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    x = _load_x(x_ptrs, m_ok[:, None], K, GATED, True)
                    w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
                else:
                    k_ok = (k0 + rk) < K
                    x = _load_x(x_ptrs, m_ok[:, None] & k_ok[None, :], K, GATED, True)
                    w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]  # [BM, BN]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class Tile:
    block_m: int  # 1: the one-row form; else rows per CTA for tl.dot (16, 32 or 64)
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Candidates per row count, (BLOCK_N, BLOCK_K, warps, stages): narrow strips and wide K tiles, so a matrix of
# 4,096 rows already gives 128-256 CTAs.
_GEMV_TILES = [(4, 1024, 4, 2), (8, 512, 4, 4), (8, 1024, 4, 2), (8, 2048, 8, 2), (16, 256, 4, 4), (16, 512, 4, 3),
               (32, 256, 4, 3), (16, 1024, 8, 2), (32, 512, 8, 3)]
_DOT_TILES = [(16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4), (64, 128, 4, 3)]


def row_block(m: int) -> int:
    """The kernel's rows per CTA for m rows: 1 (one-row form) or the next of 16, 32, 64."""
    return 1 if m == 1 else max(16, 1 << (m - 1).bit_length())


def candidates(m: int, max_shared_bytes: int = 200 << 10) -> list[Tile]:
    """The tiles worth timing for m rows whose pipelined half-precision tiles fit in `max_shared_bytes`."""
    bm = row_block(m)
    tiles = [Tile(bm, *t) for t in (_GEMV_TILES if bm == 1 else _DOT_TILES)]
    return [t for t in tiles if t.num_stages * (t.block_m + t.block_n) * t.block_k * 2 <= max_shared_bytes]


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: Tile,
                  gated: bool = False) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] with the Triton kernel and `tile`. With `gated`, x is
    [M, 2K] = [gate | up] and the product is silu(gate) * up @ weight^T (the MLP's down projection)."""
    M, K = x.shape[0], weight.shape[1]
    N = weight.shape[0]
    assert x.shape[1] == (2 * K if gated else K), f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}"
    assert weight.stride(1) == 1 and x.stride(1) == 1, "rows must be contiguous"
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)  # [M, N]
    grid = (triton.cdiv(N, tile.block_n), triton.cdiv(M, tile.block_m))  # the one-row form: a CTA per row
    skinny_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=K % tile.block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", GATED=gated, USE_PDL=pdl.enabled(),
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **pdl.launch_kwargs(),
    )
    return y


@dataclass(frozen=True)
class Choice:
    """The outcome of tuning one (rows, N, K, gated): the tile that won, or None where cuBLAS did."""

    rows: int
    n: int
    k: int
    tile: Tile | None
    cublas_us: float  # gated: the separate path, fused_ops.silu_and_mul + `linear` (as tuned for the plain shape)
    best_us: float  # of the chosen kernel (cuBLAS's time when it won)
    gbps: float  # weight bytes streamed per second by the chosen kernel
    gated: bool = False


# (N, K, dtype, gated) -> sorted [(rows, tile or None)]: a call with m rows uses the entry of the smallest tuned
# rows >= m; more rows than the largest entry, or a shape never tuned, go to cuBLAS.
_plans: dict[tuple[int, int, torch.dtype, bool], list[tuple[int, Tile | None]]] = {}
choices: list[Choice] = []


def _tile_for(x: torch.Tensor, weight: torch.Tensor, gated: bool) -> Tile | None:
    if not (x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and weight.stride(1) == 1):
        return None
    plan = _plans.get((weight.shape[0], weight.shape[1], x.dtype, gated))
    for rows, tile in plan or ():
        if x.shape[0] <= rows:
            return tile
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for shapes `tune` found the Triton kernel faster for."""
    tile = _tile_for(x, weight, gated=False)
    return F.linear(x, weight, bias) if tile is None else skinny_linear(x, weight, bias, tile)


def gated_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up @ weight^T for x [M, 2K] = [gate | up] in one kernel, where `tune(gated=...)` found that
    faster than the separate SiLU-and-mul kernel plus cuBLAS; None elsewhere (the caller runs those two)."""
    tile = _tile_for(x, weight, gated=True)
    return None if tile is None else skinny_linear(x, weight, None, tile, gated=True)


def _graph_time(fn: Callable[[], object], reps: int = 5) -> float:
    """Seconds per call of `fn`, replayed from a CUDA graph (so launch overhead is not counted)."""
    fn()  # compile / pick algorithms outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _over(ws: list[torch.Tensor], op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    """One call applies `op` to every weight in turn (a forward's worth of same-shaped matrices)."""

    def run() -> None:
        for w in ws:
            op(w)

    return run


def tune(weights: Iterable[torch.Tensor], row_counts: Iterable[int], margin: float = 0.03,
         gated: Iterable[torch.Tensor] = ()) -> list[Choice]:
    """Time cuBLAS against every candidate tile for each weight shape and row count <= MAX_ROWS, and install
    the winners for `linear`. `weights` are the model's matrices ([N, K] each); those of one shape are cycled
    through in the timing, as a forward does. The Triton kernel must beat cuBLAS by `margin` to be chosen.
    Matrices also listed in `gated` (down projections, whose input is silu(gate) * up) are tuned for
    `gated_linear` as well: the fused kernel against fused_ops.silu_and_mul followed by `linear`."""
    if not (_HAS_TRITON and _WANTED):
        log.info("skinny GEMM tuning skipped (%s)", "PDSERVE_SKINNY_GEMM=0" if _HAS_TRITON else "no triton")
        return []
    gated_ids = {id(w) for w in gated}
    by_shape: dict[tuple[int, int, torch.dtype, bool], list[torch.Tensor]] = {}
    for w in weights:
        if w.is_cuda and w.dim() == 2 and w.dtype in (torch.float16, torch.bfloat16) and w.stride(1) == 1:
            by_shape.setdefault((w.shape[0], w.shape[1], w.dtype, False), []).append(w)
            if id(w) in gated_ids:
                by_shape.setdefault((w.shape[0], w.shape[1], w.dtype, True), []).append(w)
    rows = sorted({m for m in row_counts if 1 <= m <= MAX_ROWS})
    out: list[Choice] = []
    # NOTE: plain shapes first: the gated kernel has to beat the separate path at its best, i.e. SiLU-and-mul
    # followed by whatever `linear` chose for the plain shape (Triton or cuBLAS).
    for key, ws in sorted(by_shape.items(), key=lambda kv: kv[0][3]):
        if [r for r, _ in _plans.get(key, [])] == rows:
            continue  # tuned already in this process (an earlier engine of the same shapes)
        plan = []
        for m in rows:
            choice = _tune_one(ws, m, key, margin)
            plan.append((m, choice.tile))
            out.append(choice)
        _plans[key] = plan
    choices.extend(out)
    won = sum(c.tile is not None for c in out)
    log.info("skinny GEMM: the Triton kernel won %d of %d (rows, N, K) shapes against cuBLAS", won, len(out))
    for c in out:
        log.debug("rows %d N %d K %d gated %s: cuBLAS %.1f us, chosen %s %.1f us (%.0f GB/s)", c.rows, c.n, c.k,
                  c.gated, c.cublas_us, c.tile or "cuBLAS", c.best_us, c.gbps)
    torch.cuda.synchronize()
    return out


def _tune_one(ws: list[torch.Tensor], m: int, key: tuple[int, int, torch.dtype, bool], margin: float) -> Choice:
    n, k, dtype, gated = key
    x = torch.randn(m, 2 * k if gated else k, dtype=dtype, device=ws[0].device)  # [m, K] or [m, 2K]

    def reference(w: torch.Tensor) -> torch.Tensor:
        return linear(fused_ops.silu_and_mul(x), w) if gated else F.linear(x, w)

    cublas = _graph_time(_over(ws, reference)) / len(ws)
    best, best_t = None, cublas * (1 - margin)
    for tile in candidates(m):
        try:
            t = _graph_time(_over(ws, lambda w, tile=tile: skinny_linear(x, w, None, tile, gated))) / len(ws)
        except Exception as e:
            # NOTE: a tile that cannot run here (e.g. too much shared memory on a smaller GPU) is just not a
            # candidate; visible and counted, since every such tile narrows the search.
            count_fallback("skinny_gemm_tile_failures")
            log.warning("skinny GEMM tile %s failed for rows %d N %d K %d: %s", tile, m, n, k, e)
            continue
        if t < best_t:
            best, best_t = tile, t
    chosen_t = best_t if best is not None else cublas
    return Choice(m, n, k, best, 1e6 * cublas, 1e6 * chosen_t, n * k * ws[0].element_size() / chosen_t / 1e9, gated)


def reset() -> None:
    """Forget every tuned plan (tests; an engine shut down and another started with a different model)."""
    _plans.clear()
    choices.clear()
