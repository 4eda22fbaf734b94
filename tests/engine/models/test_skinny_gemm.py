"""The small-batch Triton GEMM against F.linear (fresh random inputs every run), and the tuner's dispatch."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from engine.models import skinny_gemm

pytestmark = [pytest.mark.gpu]

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _fresh_plans() -> Iterator[None]:
    skinny_gemm.reset()
    yield
    skinny_gemm.reset()


def _check(m: int, n: int, k: int, dtype: torch.dtype, tile: skinny_gemm.Tile, gen: torch.Generator,
           bias: bool) -> None:
    x = torch.randn(m, k, generator=gen).to(_dev(), dtype)  # [M, K]
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(_dev(), dtype)  # [N, K]
    b = torch.randn(n, generator=gen).to(_dev(), dtype) if bias else None  # [N]
    got = skinny_gemm.skinny_linear(x, w, b, tile).float()
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.interpretable
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_every_tile_matches_linear(m: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Every candidate tile for m rows, on an N that is no multiple of any BLOCK_N and a K that is no
    multiple of any BLOCK_K (the masked paths), and on even shapes."""
    for i, tile in enumerate(skinny_gemm.candidates(m)):
        _check(m, 72, 200, dtype, tile, gen, bias=i % 2 == 0)
        _check(m, 64, 512, dtype, tile, gen, bias=i % 2 == 1)


@pytest.mark.interpretable
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gated_tiles_match_silu_mul_then_linear(m: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    """The fused SiLU-and-mul input (x = [gate | up]) against fused_ops.silu_and_mul then F.linear, every tile,
    masked and even K. The activation is rounded where the separate kernel rounds it, so the inputs agree
    exactly and only the summation order differs."""
    from engine.models import fused_ops

    for n, k in ((72, 200), (64, 512)):
        x = torch.randn(m, 2 * k, generator=gen).to(_dev(), dtype)  # [M, 2K] = [gate | up]
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(_dev(), dtype)  # [N, K]
        want = F.linear(fused_ops.silu_and_mul(x).float(), w.float())
        for tile in skinny_gemm.candidates(m):
            got = skinny_gemm.skinny_linear(x, w, None, tile, gated=True).float()
            torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    with pytest.raises(AssertionError, match="does not fit"):
        skinny_gemm.skinny_linear(x[:, :k], w, None, skinny_gemm.candidates(m)[0], gated=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llama_shapes_in_half_precision(dtype: torch.dtype, gen: torch.Generator) -> None:
    """Real Llama-3-8B layer shapes (qkv, o, gate_up, down) at decode row counts, every candidate tile (those
    that fit in shared memory: `candidates` prunes the rest, as a tile past the limit fails to launch)."""
    for m in (1, 32):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
            for tile in skinny_gemm.candidates(m):
                _check(m, n, k, dtype, tile, gen, bias=False)


def test_tune_installs_plans_and_linear_dispatches_by_rows(gen: torch.Generator) -> None:
    """tune() keeps a choice per (rows, N, K); linear() with m rows uses the smallest tuned rows >= m and
    cuBLAS beyond the largest, and matches F.linear either way."""
    ws = [(torch.randn(4096, 2048, generator=gen) / 45).to("cuda", torch.bfloat16) for _ in range(4)]  # [N, K]
    out = skinny_gemm.tune(ws, [1, 4, 16, 200])
    assert [(c.rows, c.n, c.k) for c in out] == [(1, 4096, 2048), (4, 4096, 2048), (16, 4096, 2048)]
    assert all(c.best_us <= c.cublas_us for c in out)
    assert skinny_gemm._plans[(4096, 2048, torch.bfloat16, False)] == [(c.rows, c.tile) for c in out]
    calls: list[skinny_gemm.Tile] = []
    real = skinny_gemm.skinny_linear

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tile: skinny_gemm.Tile) -> torch.Tensor:
        calls.append(tile)
        return real(x, w, b, tile)

    skinny_gemm.skinny_linear = spy  # type: ignore[assignment]
    try:
        for m, expect in ((1, out[0].tile), (3, out[1].tile), (9, out[2].tile), (17, None)):
            calls.clear()
            x = torch.randn(m, 2048, generator=gen).to("cuda", torch.bfloat16)
            torch.testing.assert_close(skinny_gemm.linear(x, ws[0]).float(), F.linear(x, ws[0]).float(),
                                       atol=2e-2, rtol=2e-2)
            assert calls == ([expect] if expect is not None else []), (m, calls)
    finally:
        skinny_gemm.skinny_linear = real  # type: ignore[assignment]


def test_tune_gated_dispatch(gen: torch.Generator) -> None:
    """A matrix listed in `gated` is tuned plain first, then gated against the separate path (silu_and_mul +
    linear as just tuned); gated_linear returns the fused product where a tile won and None elsewhere."""
    from engine.models import fused_ops

    ws = [(torch.randn(4096, 14336, generator=gen) / 120).to("cuda", torch.bfloat16) for _ in range(3)]  # [N, K]
    out = skinny_gemm.tune(ws, [1, 32], gated=ws)
    assert [(c.rows, c.n, c.k, c.gated) for c in out] == [(1, 4096, 14336, False), (32, 4096, 14336, False),
                                                         (1, 4096, 14336, True), (32, 4096, 14336, True)]
    assert skinny_gemm._plans[(4096, 14336, torch.bfloat16, False)] == [(c.rows, c.tile) for c in out[:2]]
    for c in out[2:]:
        x = torch.randn(c.rows, 2 * 14336, generator=gen).to("cuda", torch.bfloat16)  # [M, 2K]
        got = skinny_gemm.gated_linear(x, ws[0])
        assert (got is None) == (c.tile is None), c
        if got is not None:
            want = F.linear(fused_ops.silu_and_mul(x), ws[0])
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
