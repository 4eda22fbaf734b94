"""SyncStepper: it returns the outputs of the step's sampled tokens, and records one step in the engine's metrics
per step that sampled (a prefill chunk that samples nothing records none), host time within wall time."""

from __future__ import annotations

import pathlib

from engine import SamplingParams
from engine.stepper import SyncStepper


def test_steps_that_sample_are_recorded(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"], async_scheduling=False, max_num_batched_tokens=16)
    assert type(engine.stepper) is SyncStepper
    engine.add_request("a", list(range(3, 43)), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    per_step = []
    while engine.has_unfinished_requests():
        per_step.append([t for o in engine.step() for t in o.new_token_ids])
    # 40 prompt tokens in chunks of 16: two chunks sample nothing, the third samples the first token.
    assert [len(x) for x in per_step] == [0, 0, 1, 1, 1]
    snap = engine.metrics.snapshot()
    assert snap.steps == 3
    assert 0 < snap.host_s <= snap.total_s

