"""bench/step_trace_report.py: traced steps grouped by kind and batch size, each beside the profile's prediction."""

from __future__ import annotations

import json
import pathlib

from bench.step_trace_report import report, row_bin
from engine.step_trace import FIELDS
from planner.profile import EngineProfile
from planner.step_model import StepTimeModel, TransferTimeModel


def test_steps_are_grouped_and_set_beside_the_profile(tmp_path: pathlib.Path) -> None:
    # a step: 10 ms + 1 ms per decode row; nothing else
    prof = EngineProfile("m", "cpu", 1, 16, 16, 256, 4096, StepTimeModel(0.01, 0.0, 0.001, 0.0, 0.0),
                         TransferTimeModel(0.0, 0.0), 0.0, 0, "2026-12-01")
    steps = [  # start, seconds, poll, tokens, prefill tokens, pairs, decode rows, context
        (100.0, 0.011, 0.0, 1, 0, 0, 1, 10),  # 1 row: predicted 11 ms, took 1.0x
        (100.1, 0.022, 0.001, 1, 0, 0, 1, 10),  # 2.0x
        (100.2, 0.028, 0.0, 8, 0, 0, 8, 80),  # 8 rows: predicted 18 ms, 1.56x
        (100.3, 0.050, 0.0, 64, 64, 2080, 0, 0),  # a prompt alone: predicted 10 ms
        (200.0, 0.500, 0.0, 1, 0, 0, 1, 10),  # outside the window below
    ]
    (tmp_path / "steps-7.jsonl").write_text("\n".join([json.dumps({"pid": 7, "fields": FIELDS, "connector": None}),
                                                       *(json.dumps(s) for s in steps)]) + "\n")
    rows = report(tmp_path, prof, since=0.0, until=150.0)
    got = {(r["kind"], r["decode_rows"]): r for r in rows}
    assert sorted(got) == [("decode", 1), ("decode", 8), ("prefill", 0)]
    one = got["decode", 1]
    assert one["steps"] == 2 and abs(one["median_s"] - 0.0165) < 1e-12 and abs(one["ratio_median"] - 1.5) < 1e-9
    assert abs(one["poll_p90_s"] - 0.001) < 1e-12 and abs(one["predicted_median_s"] - 0.011) < 1e-12
    assert abs(got["decode", 8]["ratio_median"] - 0.028 / 0.018) < 1e-9
    assert abs(got["prefill", 0]["ratio_median"] - 5.0) < 1e-9
    assert [row_bin(n) for n in (1, 5, 7, 9, 300)] == [1, 4, 6, 8, 256]
