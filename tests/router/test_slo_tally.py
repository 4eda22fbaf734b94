"""The router's tally of finished requests against the adaptive split's SLOs (router/slo_tally.py), the window
the split differences it over, and the request timer's TTFT and TPOT it is fed from."""

from __future__ import annotations

import threading

import pytest

from router.metrics import RequestTimer, RouterMetrics
from router.slo_tally import MeasuredSlo, SloCounts, SloTally, SloWindow


def test_each_finished_request_counts_against_both_slos() -> None:
    tally = SloTally(slo_ttft_s=0.5, slo_tpot_s=0.02)
    for ttft, tpot in [(0.1, 0.01), (0.5, 0.02), (0.6, 0.01), (0.1, 0.03), (0.7, 0.05), (0.2, None)]:
        tally.record(ttft, tpot)
    # met both: the first two (at the SLO counts as met) and the one-token request (no TPOT to miss)
    assert tally.totals() == SloCounts(finished=6, ttft_met=4, tpot_met=4, both_met=3)


def test_slos_must_be_positive() -> None:
    with pytest.raises(ValueError, match="SLOs must be positive"):
        SloTally(0.0, 0.05)


def test_records_from_two_threads_all_count() -> None:
    tally = SloTally(1.0, 1.0)

    def burst() -> None:
        for _ in range(20_000):
            tally.record(0.5, 2.0)

    threads = [threading.Thread(target=burst) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert tally.totals() == SloCounts(40_000, 40_000, 0, 0)


def test_the_window_differences_the_oldest_snapshot_within_it_and_the_newest() -> None:
    w = SloWindow()
    assert w.window(0.0, 15.0) is None
    w.observe(0.0, SloCounts(10, 10, 10, 10))
    assert w.window(0.0, 15.0) is None  # one snapshot spans no time
    w.observe(5.0, SloCounts(20, 18, 19, 17))
    w.observe(10.0, SloCounts(30, 26, 29, 25))
    assert w.window(10.0, 15.0) == MeasuredSlo(SloCounts(20, 16, 19, 15), 10.0)
    w.observe(20.0, SloCounts(36, 30, 35, 29))
    m = w.window(20.0, 15.0)  # the 0 s snapshot fell out: from 5 s to 20 s
    assert m == MeasuredSlo(SloCounts(16, 12, 16, 12), 15.0)
    assert m.goodput_rps == pytest.approx(0.8) and m.attainment == pytest.approx(0.75)
    assert MeasuredSlo(SloCounts(), 5.0).attainment == 0.0


def test_the_request_timer_gives_ttft_and_tpot_over_the_tokens() -> None:
    t = RequestTimer(RouterMetrics(lambda: 0, lambda: 0))
    assert t.ttft_tpot(0) is None  # nothing sent
    t.start = 100.0
    t.sent()
    t.first_at, t.last = 100.25, 101.25  # first message 250 ms after arrival, the last 1 s after it
    assert t.ttft_tpot(11) == pytest.approx((0.25, 0.1))
    assert t.ttft_tpot(1) == (pytest.approx(0.25), None)
