"""Early rejection's parts: the per-instance token rate from stats records, the prediction against each class's
SLO, and the per-class prompt-token queue the router keeps (router/admission.py, router/placed_load.py)."""

from __future__ import annotations

import math
import time

import pytest

from engine.priority import Priority
from metastore.instance_stats import InstanceStatsRecord
from router.admission import (
    GAP_DEVIATIONS,
    GAP_HALF_LIFE_S,
    MIN_DRAIN_SHARE,
    TPOT_HALF_LIFE_S,
    AdmissionConfig,
    TTFTPredictor,
    TTFTSLOs,
)
from router.first_token_flow import WINDOW_S

I, B = Priority.INTERACTIVE, Priority.BATCH


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


def test_the_measured_gap_is_added_to_the_queue_part() -> None:
    p = TTFTPredictor(AdmissionConfig(default_tokens_per_s=1000))
    first = p.predict("a", 100, I)  # 100 ms of queue, no gap measured yet
    assert (first.queue_ms, first.ttft_ms) == (pytest.approx(100), pytest.approx(100))
    t = time.monotonic()
    p.measured("a", I, first, 400.0, now=t)  # it took 400 ms: 300 ms the queue does not explain
    assert p.predict("a", 100, I).ttft_ms == pytest.approx(400, abs=1)
    p.measured("a", I, first, 50.0, now=t)  # faster than the queue part: a gap of -50 ms, smoothed in
    # the mean moves 20% of the way to -50, the mean deviation 20% of the way to |-50 - 300|: mean + 1.6 deviations
    want = 0.8 * 300 + 0.2 * -50 + GAP_DEVIATIONS * 0.2 * 350
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


def test_a_lower_class_queue_drains_with_what_higher_arrivals_leave() -> None:
    p = TTFTPredictor(AdmissionConfig(default_tokens_per_s=1000))
    t = time.monotonic()
    for k in range(10):  # interactive prompts admitted at 100 tokens every 0.5 s: about 200 tokens/s
        p.admitted("a", I, 100, now=t + 0.5 * k)
        p.measured("a", I, p.predict("a", 0, I, now=t + 0.5 * k), 0.0, 100, now=t + 0.5 * k)  # out at once
    p.gaps.clear()
    now = t + 4.5
    want = 100 * sum(math.exp(-0.5 * k / WINDOW_S) for k in range(10)) / WINDOW_S  # the decayed sum, per window
    assert p.arrival_rate("a", I, now=now) == pytest.approx(want)
    assert p.arrival_rate("a", I, now=now + WINDOW_S) == pytest.approx(want / math.e)  # it fades without arrivals
    # (no busy time measured: the rate is the default) a batch request's 1000 tokens drain at 1000 - that rate
    batch = p.predict("a", 1000, B, now=now)
    assert batch.queue_ms == pytest.approx(1e6 / (1000 - want))
    assert batch.drain_tokens_per_s == pytest.approx(1000 - want)
    assert p.predict("a", 1000, I, now=now).queue_ms == pytest.approx(1000)  # an interactive one's at all of it
    assert p.arrival_rate("b", I, now=now) == 0 and p.predict("b", 1000, B, now=now).queue_ms == pytest.approx(1000)
    # interactive arrivals that take the whole rate: the batch queue drains at MIN_DRAIN_SHARE of it
    p.admitted("a", I, 10 * 1000 * int(WINDOW_S), now=now)
    starved = p.predict("a", 300, B, now=now)  # NOTE: the 50,000 interactive tokens also wait ahead of it
    assert starved.drain_tokens_per_s == pytest.approx(MIN_DRAIN_SHARE * 1000) and starved.misses
    assert "left by higher classes' arrivals" in starved.reason(B, "a")


def test_the_rate_is_the_flow_to_first_token_per_busy_second() -> None:
    """Little's law on the instance's flow: tokens ahead / tokens per busy second through to the first token."""
    p = TTFTPredictor(AdmissionConfig(default_tokens_per_s=100_000))
    t = time.monotonic()
    flow_at = t
    for k in range(40):  # 4 requests of 250 tokens admitted at once, first tokens 0.25 s apart: 1000 tokens/s
        now = t + k
        p.admitted("a", B, 250, now=now)
        for _ in range(3):
            p.admitted("a", I, 250, now=now)
        for j in range(3):
            p.measured("a", I, p.predict("a", 0, I, now=now), 250.0, 250, now=now + 0.25 * (j + 1))
        p.measured("a", B, p.predict("a", 0, B, now=now), 1000.0, 250, now=now + 1.0)
        flow_at = now + 1.0
    flow = p.flows["a"]
    assert flow.ahead(B) == 0 and flow.requests == 0
    # busy all along, 1000 tokens a second (within the decay's weighting of tokens that come out in steps)
    assert flow.throughput(flow_at) == pytest.approx(1000, rel=0.05)
    p.gaps.clear()
    p.admitted("a", I, 500, now=flow_at)  # 500 interactive tokens now wait
    pred = p.predict("a", 250, I, now=flow_at)
    rate = flow.throughput(flow_at)
    assert pred.measured and pred.queued_tokens == 750 and pred.queue_ms == pytest.approx(750e3 / rate)
    # an admitted request that ends without a first token leaves the flow too
    p.abandoned("a", I, 500, now=flow_at)
    assert flow.ahead(I) == 0 and flow.requests == 0
    # idle time does not count: an hour later the throughput is what it was (decayed sums of both parts)
    assert flow.throughput(flow_at + 3600) is None or flow.throughput(flow_at + 3600) == pytest.approx(1000)


def test_a_class_whose_recent_tpot_is_over_the_slo_is_refused_until_it_fades() -> None:
    p = TTFTPredictor(AdmissionConfig(default_tokens_per_s=1000, tpot_slo_ms=200))
    t = time.monotonic()
    assert not p.predict("p0", 100, B, now=t, decode_id="d0").misses  # nothing measured: admitted
    for _ in range(5):
        p.tpot_measured("d0", B, 500.0, now=t)  # batch requests decoded at 500 ms a token on d0
    p.tpot_measured("d0", I, 50.0, now=t)
    batch = p.predict("p0", 100, B, now=t, decode_id="d0")
    assert batch.tpot_ms == pytest.approx(500) and batch.misses_tpot and batch.misses
    assert "time per output token on d0 has lately been 500 ms" in batch.reason(B, "p0", "d0")
    assert not p.predict("p0", 100, I, now=t, decode_id="d0").misses  # per class
    assert not p.predict("p0", 100, B, now=t, decode_id="d1").misses  # and per decode instance
    # it halves every TPOT_HALF_LIFE_S without a new measurement: 500 -> 125 ms after two half-lives
    assert not p.predict("p0", 100, B, now=t + 2 * TPOT_HALF_LIFE_S, decode_id="d0").misses
    # without a TPOT SLO the same measurements refuse nothing
    q = TTFTPredictor(AdmissionConfig(default_tokens_per_s=1000))
    q.tpot_measured("d0", B, 500.0, now=t)
    assert not q.predict("p0", 100, B, now=t, decode_id="d0").misses
    with pytest.raises(ValueError, match="tpot_slo_ms"):
        AdmissionConfig(tpot_slo_ms=0)
