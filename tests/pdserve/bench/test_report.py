"""The bench summary on exact per-request results: percentiles, throughput, goodput under the SLOs (TPOT only
counts for requests with more than one token), errors by code, prefix hit rate, and the table's lines."""

from __future__ import annotations

import pytest

from pdserve.bench.report import percentile, summarize, table
from pdserve.bench.runner import Result


def test_percentile_interpolates_linearly() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([1.0, 2.0], 100) == 2.0 and percentile([1.0, 2.0], 0) == 1.0


def test_summary_of_exact_results() -> None:
    results = [
        Result(0, 100, ttft_s=0.1, tpot_s=0.01, e2e_s=0.2, output_tokens=10, cached_tokens=50,
               disaggregated=True, transferred_blocks=4, decode_instance="d0"),
        Result(1, 100, ttft_s=0.3, tpot_s=None, e2e_s=0.3, output_tokens=1, decode_instance="d1"),  # 1 token
        Result(2, 200, ttft_s=0.1, tpot_s=0.05, e2e_s=0.6, output_tokens=10, cached_tokens=150,
               decode_instance="d0"),  # misses the TPOT SLO
        Result(3, 100, status="RESOURCE_EXHAUSTED"),
        Result(4, 100, status="NOT_SENT"),
    ]
    s = summarize(results, 2.0, slo_ttft_s=0.5, slo_tpot_s=0.02)
    assert (s["requests"], s["succeeded"]) == (5, 3)
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 1, "NOT_SENT": 1}
    assert s["request_throughput"] == 1.5 and s["output_token_throughput"] == 10.5
    assert s["goodput"] == 1.0 and s["slo_attainment"] == pytest.approx(2 / 3)  # requests 0 and 1
    assert s["ttft_s_50"] == 0.1 and s["ttft_s_99"] == pytest.approx(0.296)
    assert s["tpot_s_50"] == pytest.approx(0.03) and s["e2e_s_90"] == pytest.approx(0.54)
    assert s["prefix_hit_rate"] == 0.5  # 200 cached of 400 prompt tokens (failed requests excluded)
    assert s["disaggregated_share"] == pytest.approx(1 / 3) and s["transferred_blocks"] == 4
    assert s["decode_instances"] == {"d0": 2, "d1": 1}
    lines = table(s, 4.0).splitlines()
    assert lines[0] == "== rate 4 req/s: 3/5 succeeded in 2.0 s; errors {'RESOURCE_EXHAUSTED': 1, 'NOT_SENT': 1}"
    assert lines[2] == "TTFT" + " " * 6 + "    100.0    260.0    296.0"
    assert lines[6] == "goodput    1.00 req/s meeting TTFT <= 500 ms and TPOT <= 20 ms (67% of requests)"
    assert lines[7] == "prefix hit rate 50.0% of prompt tokens; disaggregated 33%; 4 KV blocks transferred"


def test_nothing_succeeded_is_zero_not_a_division_error() -> None:
    s = summarize([Result(0, 10, status="UNAVAILABLE")], 0.0, 1.0, 1.0)
    assert s["succeeded"] == 0 and s["goodput"] == 0.0 and s["slo_attainment"] == 0.0
    assert s["prefix_hit_rate"] == 0.0 and s["ttft_s_50"] is None
    assert table(s).splitlines()[2] == "TTFT" + " " * 14 + "-        -        -"
