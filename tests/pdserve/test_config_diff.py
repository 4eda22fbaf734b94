"""`pdserve apply`'s diff: pool sizes and placement apply live, everything else is named as needing a restart."""

from __future__ import annotations

import dataclasses
import pathlib

from pdserve.config import load_config
from pdserve.config_diff import diff

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_live_and_restart_differences(models: dict[str, pathlib.Path]) -> None:
    running = load_config(ROOT / "deploy/ray/serving-tiny-cpu.yaml", {"engine.model": str(models["llama"])})
    assert diff(running, running) == diff(running, dataclasses.replace(running))
    assert not diff(running, running).replicas and not diff(running, running).needs_restart
    edited = dataclasses.replace(
        running, pools=dataclasses.replace(running.pools, prefill=dataclasses.replace(running.pools.prefill,
                                                                                      replicas=3)),
        placement=dataclasses.replace(running.placement, kv_weight=0.25),
        engine=dataclasses.replace(running.engine, max_num_seqs=8),
        server=dataclasses.replace(running.server, drain_grace_s=2.0))
    d = diff(running, edited)
    assert d.replicas == {"prefill": 3}
    assert d.policy == {"kv_weight": 0.25}
    assert d.needs_restart == ["engine.max_num_seqs: 16 -> 8", "server.drain_grace_s: 1.0 -> 2.0"]
