"""The router's gRPC handlers parse requests without raising: bad bytes become `Undecodable` (refused with
INVALID_ARGUMENT by the service, tests/e2e/test_bad_input.py), and the refusals are logged at a bounded rate."""

from __future__ import annotations

import logging

import pytest

import api.v1.pdserve_pb2 as pb
from router.wire import RateLimitedWarning, Undecodable, _parser


def test_bad_bytes_become_undecodable_and_good_bytes_parse() -> None:
    parse = _parser(pb.GenerateRequest, "GenerateRequest")
    good = pb.GenerateRequest(request_id="a", token_ids=pb.TokenIds(ids=[1, 2]))
    assert parse(good.SerializeToString()) == good
    bad = parse(b"\x12\x03\xff\xfe\xfd")  # text field with invalid UTF-8
    assert isinstance(bad, Undecodable) and bad.method == "GenerateRequest" and bad.num_bytes == 5
    assert isinstance(parse(b"\x1a\x09\x0a"), Undecodable)  # a nested message cut short


def test_warnings_are_rate_limited_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.wire")
    limited = RateLimitedWarning(logger, interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="test.wire"):
        for i in range(500):
            limited.warn(f"event {i}")
    assert [r.getMessage() for r in caplog.records] == ["event 0"] and limited.count == 500
    limited.interval_s = 0.0
    limited._next = 0.0
    with caplog.at_level(logging.WARNING, logger="test.wire"):
        limited.warn("event 500")
    assert caplog.records[-1].getMessage() == "event 500 (499 more since the last such line)"
