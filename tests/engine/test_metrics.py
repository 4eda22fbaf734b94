"""EngineMetrics: counts, step timings, watched counters and process-wide fallbacks in one snapshot."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from engine import metrics
from engine.metrics import EngineMetrics, count_fallback, fallback_counts


@pytest.fixture(autouse=True)
def clean_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_fallbacks", Counter())


def test_snapshot_folds_counts_watched_counters_and_process_fallbacks() -> None:
    m = EngineMetrics()
    runner_counters: Counter[str] = Counter()
    m.watch(runner_counters)
    m.count("local_fallbacks")
    m.count("local_fallbacks", 2)
    runner_counters["cuda_graph_capture_failures"] += 1  # counted after watch(): still seen
    count_fallback("pdl_unsupported")
    count_fallback("skinny_gemm_tile_failures", 3)
    m.record_step(0.25, 1.0)
    m.record_step(0.5, 2.0)
    snap = m.snapshot()
    assert snap.counters == {"local_fallbacks": 3, "cuda_graph_capture_failures": 1, "pdl_unsupported": 1,
                             "skinny_gemm_tile_failures": 3}
    assert (snap.steps, snap.host_s, snap.total_s) == (2, 0.75, 3.0)
    assert fallback_counts() == {"pdl_unsupported": 1, "skinny_gemm_tile_failures": 3}


def test_process_fallbacks_reach_every_engine_and_snapshots_are_frozen() -> None:
    a, b = EngineMetrics(), EngineMetrics()
    a.count("x")
    count_fallback("attention_auto_fallback_to_torch")
    first = a.snapshot()
    assert b.snapshot().counters == {"attention_auto_fallback_to_torch": 1}
    a.count("x")
    a.record_step(1.0, 1.0)
    assert first.counters == {"x": 1, "attention_auto_fallback_to_torch": 1} and first.steps == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.steps = 3  # type: ignore[misc]


def test_kernel_fallbacks_are_counted_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """select_backend's auto fallback (CUDA without a usable Triton) lands in every engine's snapshot."""
    from engine import attention
    from engine.attention.flash_attn_backend import FlashAttnPagedAttention
    from engine.attention.torch_ref import TorchPagedAttention

    monkeypatch.setattr(FlashAttnPagedAttention, "supports", staticmethod(lambda *a: "not here"))
    monkeypatch.setattr(attention, "_triton_unusable", lambda device: "no triton in this test")
    assert attention.select_backend("auto", "cuda", 16, 64) is TorchPagedAttention
    assert EngineMetrics().snapshot().counters == {"attention_auto_fallback_to_torch": 1}
