"""Early rejection's parts: the per-instance token rate from stats records, the prediction against each class's
SLO, and the per-class prompt-token queue the router keeps (router/admission.py, router/placed_load.py)."""

from __future__ import annotations

import time

import pytest

from engine.priority import Priority
from metastore.instance_stats import InstanceStatsRecord
from router.admission import GAP_DEVIATIONS, GAP_HALF_LIFE_S, AdmissionConfig, TTFTPredictor, TTFTSLOs
from router.placed_load import PlacedLoad
from router.placement import Placement

I, B = Priority.INTERACTIVE, Priority.BATCH


def placement(prefill: str | None, decode: str, tokens: int) -> Placement:
    return Placement(decode, prefill, cached_tokens=0, effective_prefill_tokens=tokens, reason="test")


def test_rate_is_measured_between_records_and_smoothed() -> None:
    p = TTFTPredictor(AdmissionConfig(early_reject=True, default_tokens_per_s=100))
    assert p.predict("a", 50, I).ttft_ms == pytest.approx(500) and not p.predict("a", 50, I).measured
    p.observe({"a": InstanceStatsRecord(computed_tokens=1000, compute_seconds=1.0)})  # 1000 tokens/s so far
    assert p.rates["a"] == pytest.approx(1000)
    p.observe({"a": InstanceStatsRecord(computed_tokens=1000 + 3000, compute_seconds=2.0)})  # 3000/s since
    assert p.rates["a"] == pytest.approx(0.5 * 3000 + 0.5 * 1000)
    pred = p.predict("a", 4000, B)
    assert pred.measured and pred.ttft_ms == pytest.approx(2000) and not pred.misses  # batch SLO 5000 ms
    assert p.predict("a", 4000, I).misses  # interactive SLO 500 ms
    assert "over the interactive class's budget of 500 ms" in p.predict("a", 4000, I).reason(I, "a")


def test_slos_are_validated() -> None:
    with pytest.raises(ValueError, match="batch: 0 must be > 0"):
        TTFTSLOs(batch=0)
    assert TTFTSLOs(interactive=1, batch=2).of(B) == 2


def test_the_queue_ahead_counts_only_the_class_and_higher() -> None:
    load = PlacedLoad()
    for rid, prio, tokens in (("b1", B, 300), ("i1", I, 40), ("b2", B, 200)):
        load.classify(rid, prio)
        load.placed(rid, placement("p0", "d0", tokens), None)
    assert load.queued_for("p0", I) == 40 and load.queued_for("p0", B) == 540 and load.pending_on["p0"] == 540
    load.prefill_finished("b1")
    assert load.queued_for("p0", B) == 240
    # re-placed (a retried prefill on the decode instance): it keeps its class
    load.placed("i1", placement(None, "d0", 40), placement("p0", "d0", 40))
    assert load.queued_for("p0", I) == 0 and load.queued_for("d0", I) == 40
    load.finished("i1", placement(None, "d0", 40))
    load.finished("b2", placement("p0", "d0", 200))
    load.finished("b1", placement("p0", "d0", 300))
    assert not load.pending_by_class and not load.priority_of and not load.pending_on


def test_the_measured_gap_is_added_to_the_queue_part() -> None:
    p = TTFTPredictor(AdmissionConfig(default_tokens_per_s=1000))
    first = p.predict("a", 100, I)  # 100 ms of queue, no gap measured yet
    assert (first.queue_ms, first.ttft_ms) == (pytest.approx(100), pytest.approx(100))
    t = time.monotonic()
    p.measured("a", I, first, 400.0, now=t)  # it took 400 ms: 300 ms the queue does not explain
    assert p.predict("a", 100, I).ttft_ms == pytest.approx(400, abs=1)
    p.measured("a", I, first, 50.0, now=t)  # faster than the queue part: a gap of 0, smoothed in
    # the mean moves 20% of the way to 0, the mean deviation 20% of the way to |0 - 300|: mean + 1.6 deviations
    want = 0.8 * 300 + GAP_DEVIATIONS * 0.2 * 300
    assert p.gap("a", I, now=t) == pytest.approx(want)
    # without new measurements it fades (a class whose requests are all refused measures nothing)
    assert p.gap("a", I, now=t + 2 * GAP_HALF_LIFE_S) == pytest.approx(want / 4)
    assert p.predict("b", 100, I).ttft_ms == pytest.approx(100)  # per instance
    assert p.predict("a", 100, B).ttft_ms == pytest.approx(100)  # and per class


def test_the_headroom_lowers_the_budget_and_is_checked() -> None:
    cfg = AdmissionConfig(slo_headroom=0.2, ttft_slo_ms=TTFTSLOs(interactive=500, batch=5000))
    assert cfg.budget_ms(I) == pytest.approx(400) and cfg.budget_ms(B) == pytest.approx(4000)
    p = TTFTPredictor(AdmissionConfig(default_tokens_per_s=1000, slo_headroom=0.2))
    assert not p.predict("a", 390, I).misses and p.predict("a", 410, I).misses  # 410 ms: under 500, over 400
    with pytest.raises(ValueError, match="slo_headroom"):
        AdmissionConfig(slo_headroom=1.0)
