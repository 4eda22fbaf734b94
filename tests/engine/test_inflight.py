"""The in-flight step of async scheduling: which input rows take a token still on the device (feed), and the
device-side substitution of those placeholders (feed_tokens). The protocol end to end: test_async_stepper.py."""

from __future__ import annotations

import numpy as np
import torch

from engine.inflight import InflightStep, feed_tokens
from engine.request import PLACEHOLDER, Request
from engine.sampling_params import SamplingParams


def request(rid: str, pending: bool) -> Request:
    r = Request(rid, [5, 6, 7], SamplingParams(max_tokens=8), 0)
    if pending:
        r.append_placeholder()
    return r


def test_feed_points_each_placeholder_row_at_its_requests_token() -> None:
    a, b, c = request("a", True), request("b", False), request("c", True)
    # The launched step sampled rows [a, b, c]; a and c carry placeholders for those tokens, b did not.
    step = InflightStep.launch([a, b, c], [True, False, True], torch.tensor([41, 42, 43]))
    assert step.wait() == [41, 42, 43]
    # The next step schedules c (1 token), b (a 3-token chunk), a (1 token): rows 0 | 1..3 | 4.
    feed = step.feed([c, b, a], np.array([0, 1, 4, 5]))
    assert feed is not None and feed.tolist() == [2, -1, -1, -1, 0]
    assert step.feed([b], np.array([0, 3])) is None  # nothing pending: no feed at all


def test_feed_tokens_replaces_only_the_fed_rows() -> None:
    input_ids = torch.tensor([PLACEHOLDER, 11, 12, 13, PLACEHOLDER])
    got = feed_tokens(input_ids, torch.tensor([2, -1, -1, -1, 0]), torch.tensor([41, 42, 43]))
    assert got.tolist() == [43, 11, 12, 13, 41]
    assert input_ids.tolist() == [PLACEHOLDER, 11, 12, 13, PLACEHOLDER]  # a new tensor; the input is unchanged
