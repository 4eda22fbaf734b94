"""PDSERVE_STEP_TRACE: every step that computed a token, one JSON line each, with its exact shape."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from engine.sampling_params import SamplingParams
from engine.step_trace import FIELDS
from engine.step_work import chunk_pairs


def test_each_step_is_written_with_its_shape(models: dict[str, pathlib.Path], engine_factory, tmp_path: pathlib.Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_STEP_TRACE", str(tmp_path / "trace"))
    engine = engine_factory(models["llama"], max_num_batched_tokens=128)
    before = time.time()
    engine.add_request("a", list(range(5, 25)), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    engine.add_request("b", list(range(5, 35)), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    engine.shutdown()  # writes what is left
    (path,) = (tmp_path / "trace").glob("steps-*.jsonl")
    header, *lines = path.read_text().splitlines()
    assert json.loads(header)["connector"] is None and json.loads(header)["fields"] == list(FIELDS)
    rows = [dict(zip(FIELDS, json.loads(line), strict=True)) for line in lines]
    # both prompts in one step (20 + 30 tokens), then two decode steps of both rows (the first tokens came with
    # the prefill), attending to 21 + 31 and 22 + 32 tokens
    shapes = [(r["tokens"], r["prefill_tokens"], r["prefill_pairs"], r["decode_rows"], r["decode_context"])
              for r in rows]
    assert shapes == [(50, 50, chunk_pairs(0, 20) + chunk_pairs(0, 30), 0, 0), (2, 0, 0, 2, 52), (2, 0, 0, 2, 54)]
    assert steps == 3
    assert all(before <= r["start_unix_s"] <= time.time() and 0 <= r["poll_seconds"] <= r["seconds"] for r in rows)
    assert [r["start_unix_s"] for r in rows] == sorted(r["start_unix_s"] for r in rows)


def test_off_by_default(models: dict[str, pathlib.Path], engine_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_STEP_TRACE", raising=False)
    assert engine_factory(models["llama"]).step_trace is None


def test_step_profile_writes_one_report_per_served_step(models: dict[str, pathlib.Path], engine_factory,
                                                          tmp_path: pathlib.Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """PDSERVE_STEP_PROFILE=2: the first two steps that computed tokens each get a cProfile report beside the
    trace, naming the engine's step; later steps get none."""
    monkeypatch.setenv("PDSERVE_STEP_TRACE", str(tmp_path))
    monkeypatch.setenv("PDSERVE_STEP_PROFILE", "2")
    engine = engine_factory(models["llama"])
    engine.add_request("a", list(range(5, 25)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()  # waits for the reports' writer
    reports = sorted(p.name for p in tmp_path.glob("profile-*.txt"))
    assert [r.split("-")[-1] for r in reports] == ["step1.txt", "step2.txt"]
    text = (tmp_path / reports[0]).read_text()
    assert text.startswith("step wall time ") and "llm_engine.py" in text and "(schedule)" in text


def test_step_profile_without_a_trace_directory_is_off(models: dict[str, pathlib.Path], engine_factory,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("PDSERVE_STEP_TRACE", raising=False)
    monkeypatch.setenv("PDSERVE_STEP_PROFILE", "3")
    with caplog.at_level("WARNING"):
        assert engine_factory(models["llama"]).step_profile is None
    assert "PDSERVE_STEP_PROFILE=3 is ignored" in caplog.text
