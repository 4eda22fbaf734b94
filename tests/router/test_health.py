"""Per-instance circuit breakers (router/health.py): exact transitions, with the clock moved by hand."""

from __future__ import annotations

import pytest

from metastore.store import InstanceInfo
from router import health as health_module
from router.health import InstanceHealth


def inst(pid: int) -> InstanceInfo:
    return InstanceInfo(instance_id="p0", role="prefill", address="p0", tp_size=1, block_size=16, num_blocks=8,
                        max_num_seqs=4, pid=pid)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(health_module.time, "monotonic", lambda: now[0])
    return now


def test_failures_open_after_the_threshold_and_death_at_once(clock: list[float]) -> None:
    h = InstanceHealth(threshold=3, cooldown_s=5.0)
    h.failed("p0", 7, dead=False, why="timeout")
    h.failed("p0", 7, dead=False, why="timeout")
    assert h.usable(inst(7))  # two in a row: still closed
    h.succeeded("p0")
    h.failed("p0", 7, dead=False, why="timeout")
    h.failed("p0", 7, dead=False, why="timeout")
    assert h.usable(inst(7))  # the success reset the count
    h.failed("p0", 7, dead=False, why="timeout")
    assert not h.usable(inst(7)) and h.counters["opened"] == 1
    other = InstanceHealth(threshold=3)
    other.failed("p0", 7, dead=True, why="died")
    assert not other.usable(inst(7))


def test_half_open_lets_one_probe_through_and_its_result_decides(clock: list[float]) -> None:
    h = InstanceHealth(threshold=1, cooldown_s=5.0)
    h.failed("p0", 7, dead=True, why="died")
    clock[0] += 4.9
    assert not h.usable(inst(7))
    clock[0] += 0.2  # cooldown over: half-open
    assert h.usable(inst(7))
    h.placed("p0")  # the probe
    assert not h.usable(inst(7)) and h.counters["probes"] == 1  # one at a time
    h.failed("p0", 7, dead=False, why="timeout")  # the probe failed: open again
    assert not h.usable(inst(7)) and h.counters["reopened"] == 1
    clock[0] += 5.1
    h.placed("p0")
    h.succeeded("p0")
    assert h.usable(inst(7)) and h.counters["closed"] == 1
    h.placed("p0")
    assert h.usable(inst(7))  # closed: placing is no probe


def test_a_restarted_instance_is_usable_at_once(clock: list[float]) -> None:
    h = InstanceHealth(threshold=1, cooldown_s=60.0)
    h.failed("p0", 7, dead=True, why="died")
    assert not h.usable(inst(7))
    assert h.usable(inst(8))  # registered again by a new process
    assert h.counters["closed_restarted"] == 1 and h.usable(inst(7))
