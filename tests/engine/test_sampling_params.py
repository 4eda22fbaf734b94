"""SamplingParams: every bad field is refused with a message naming it, on construction and on validate()."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
    ({"max_tokens": 2.0}, "max_tokens must be a positive integer, got 2.0"),
    ({"temperature": -0.1}, "temperature must be a finite number >= 0, got -0.1"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0, got inf"),
    ({"top_p": float("nan")}, r"top_p must be in \(0, 1\], got nan"),
    ({"max_tokens": True}, "max_tokens must be a positive integer, got True"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -2}, r"top_k must be -1, 0 \(disabled\) or a positive integer, got -2"),
    ({"top_k": 1.5}, "top_k must be .* got 1.5"),
    ({"seed": "7"}, "seed must be an integer, got '7'"),
    ({"stop": ["ok", ""]}, "stop strings must be non-empty"),
    ({"stop": ""}, "stop strings must be non-empty"),
])
def test_bad_fields_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_validate_catches_a_change_after_construction() -> None:
    params = SamplingParams()
    params.max_tokens = -1
    with pytest.raises(ValueError, match="max_tokens must be a positive integer, got -1"):
        params.validate()


def test_defaults_edges_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.stop, p.stop_token_ids) == \
        (16, 1.0, 0, 1.0, None, [], [])
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=-1, seed=0)  # every edge is accepted
    assert SamplingParams(stop="END").stop == ["END"]  # one string is a list of one
    ids = (3, 4)
    assert SamplingParams(stop_token_ids=ids).stop_token_ids == [3, 4]  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "greedy"), [
    ({"temperature": 0.0}, True), ({"top_k": 1}, True), ({"temperature": 0.7}, False), ({"top_k": 2}, False),
])
def test_greedy(kwargs: dict[str, object], greedy: bool) -> None:
    assert SamplingParams(**kwargs).greedy is greedy  # type: ignore[arg-type]
