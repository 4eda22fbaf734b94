"""The bench workload: length distributions parsed from their spec strings, and bad specs refused clearly."""

from __future__ import annotations

import pathlib

import pytest

from pdserve.bench import workload


def test_bad_distribution_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="uniform:LO:HI"):
        workload.Distribution("uniform:5")


def test_offered_rate_counts_the_arrivals_a_run_sends() -> None:
    work = [workload.BenchRequest(i, t, [5], 1) for i, t in enumerate([0.0, 0.5, 1.0, 1.5, 9.0])]
    assert workload.offered_rate(work, 100.0) == pytest.approx(4 / 9.0)
    assert workload.offered_rate(work, 2.0) == pytest.approx(3 / 1.5)  # the one at 9 s is not sent
    assert workload.offered_rate(work[:1], 100.0) == 0.0
    assert workload.offered_rate([workload.BenchRequest(0, 1.0, [5], 1)] * 3, 100.0) == 0.0  # all at once


def test_number_lists_name_the_flag_when_malformed() -> None:
    assert workload.numbers("0.5,1", "--time-scale") == [0.5, 1.0]
    with pytest.raises(ValueError, match=r"--time-scale: expected comma-separated numbers, got '0.5,x'"):
        workload.numbers("0.5,x", "--time-scale")


def test_a_salted_trace_keeps_its_shape_and_reuse_but_not_its_tokens() -> None:
    trace = pathlib.Path(__file__).resolve().parents[2] / "data" / "mooncake_trace_first200.jsonl"
    plain = workload.mooncake_trace(trace, 50, 4096, tokens_per_block=4)
    salted = workload.mooncake_trace(trace, 50, 4096, tokens_per_block=4, salt=1)
    assert [(r.arrival_s, len(r.tokens), r.max_tokens, r.hash_ids) for r in plain] == [
        (r.arrival_s, len(r.tokens), r.max_tokens, r.hash_ids) for r in salted]
    assert all(a.tokens != b.tokens for a, b in zip(plain, salted, strict=True))
    blocks = {}  # hash id -> its 4 tokens: equal ids stay equal blocks under the salt
    for r in salted:
        for k, h in enumerate(r.hash_ids):
            chunk = r.tokens[4 * k:4 * k + 4]
            if len(chunk) == 4:
                assert blocks.setdefault(h, chunk) == chunk
