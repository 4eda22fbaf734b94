"""The adaptive split's parts: the workload window from stats records, the re-plan, and the hysteresis of its
decisions against a real Redis and a real Admin channel (this test answers the commands, as the executor would)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from engine.step_work import StepWork
from metastore import InstanceInfo, InstanceStatsRecord, Load, MetadataStore, RedisServer
from metastore.admin import AdminChannel, AdminReply
from pdserve.adaptive_metrics import AdaptiveCollector
from pdserve.adaptive_split import (
    MAX_SLOWDOWN,
    MIN_CALIBRATION_STEPS,
    AdaptiveSplit,
    WorkloadMeter,
    WorkloadWindow,
    replan,
    step_slowdown,
)
from pdserve.config import AdaptiveConfig
from planner.plan import SLO
from planner.simulate import Split
from planner.step_model import StepShape
from router.slo_tally import MeasuredSlo, SloCounts
from tests.planner.test_simulate import profile


def rec(n: int, prompt: int, output: int, queries: int = 0, hits: int = 0, steps: int = 0,
        seconds: float = 0.0) -> InstanceStatsRecord:
    """`steps` decode steps of 4 rows at context 100 each, taking `seconds` in all."""
    return InstanceStatsRecord(requests_finished=n, prompt_tokens_finished=prompt, output_tokens_finished=output,
                               prefix_cache_queries=queries, prefix_cache_hits=hits, work_steps=steps,
                               computed_tokens=4 * steps, work_decode_seqs=4 * steps,
                               work_decode_context=400 * steps, compute_seconds=seconds)


def test_workload_window_differences_the_decode_pools_totals_and_everyones_work() -> None:
    m = WorkloadMeter()
    decode = {"d0", "d1"}
    m.observe(0.0, {"d0": rec(100, 10_000, 500, steps=50, seconds=1.0), "d1": rec(7, 70, 7),
                    "p0": rec(40, 4_000, 40, steps=5, seconds=0.5)}, decode)  # baselines only
    m.observe(10.0, {"d0": rec(110, 12_000, 600, 2_000, 500, steps=80, seconds=2.0),
                     "d1": rec(17, 2_070, 107, steps=10, seconds=0.25),
                     "p0": rec(50, 5_000, 50, steps=15, seconds=1.5)}, decode)
    m.observe(20.0, {"d0": rec(120, 14_000, 700, 4_000, 1_000, steps=90, seconds=2.5),
                     "d1": rec(3, 300, 30, steps=3, seconds=0.1),  # d1 restarted: a new baseline
                     "p0": rec(60, 6_000, 60, steps=16, seconds=1.75)}, decode)
    w = m.window(20.0, 60.0)
    # requests from the decode pool only (p0's finishes are the same requests leaving the prefill pool); the
    # work of every instance: d0 40 steps / 1.5 s, d1 10 / 0.25, p0 11 / 1.25
    assert w == WorkloadWindow(requests=30, rate_rps=1.5, mean_prompt_tokens=6_000 / 30,
                               mean_output_tokens=300 / 30, prefix_hit_rate=0.25,
                               work=StepWork(61, 244, 0, 0, 244, 24_400, pytest.approx(3.0)))
    m.observe(40.0, {"d0": rec(120, 14_000, 700, 4_000, 1_000)}, decode)
    assert m.window(40.0, 25.0) is None  # the window holds no finished request


def test_step_slowdown_compares_the_same_steps() -> None:
    prof = profile(per_decode_seq_s=0.0005)
    work = rec(0, 0, 0, steps=40, seconds=0.0).work
    predicted = prof.step.predict_sum(40, StepShape(decode_seqs=160, decode_context=16_000))
    assert predicted == pytest.approx(40 * prof.step.predict(StepShape(decode_seqs=4, decode_context=400)))
    assert step_slowdown(prof, dataclasses.replace(work, seconds=2.5 * predicted)) == pytest.approx(2.5)
    assert step_slowdown(prof, dataclasses.replace(work, seconds=1e3)) == MAX_SLOWDOWN  # clamped
    assert step_slowdown(prof, dataclasses.replace(work, steps=MIN_CALIBRATION_STEPS - 1, seconds=1.0)) is None


def test_replan_moves_long_prompts_toward_prefill_and_short_ones_back() -> None:
    prof, slo = profile(per_decode_seq_s=0.0005), SLO(2.0, 0.03)
    long = replan(prof, slo, WorkloadWindow(100, 1.0, 400, 20, 0.0), Split(0, 2))
    assert long.target.prefill == 1 and long.best.goodput_rps > long.current.goodput_rps
    short = replan(prof, slo, WorkloadWindow(100, 1.0, 8, 20, 0.0), Split(1, 1, 32))
    assert short.target.prefill == 0 or short.target.max_local_prefill_tokens >= 8  # every prompt local


@pytest.fixture
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def store(redis_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(redis_url, namespace="adaptive", registry_lease_s=30.0)
    yield s
    s.close()


def test_a_change_needs_patience_and_waits_out_its_cooldown(store: MetadataStore, redis_url: str,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    profile(per_decode_seq_s=0.0005).save(path)
    cfg = AdaptiveConfig(enabled=True, profile=str(path), slo_ttft_ms=2000, slo_tpot_ms=30, window_s=100,
                         min_requests=5, patience=2, cooldown_s=50)
    roles = {"decode-0": "decode", "decode-1": "decode"}
    for iid in roles:
        store.register(InstanceInfo(instance_id=iid, role="decode", address=iid, tp_size=1, block_size=16,
                                    num_blocks=100, max_num_seqs=4))
    channel = AdminChannel(redis_url, "adaptive")
    commands = []

    def executor() -> None:  # answers one command, as pdserve/admin_executor.py would
        cmd = channel.take(wait_s=30)
        assert cmd is not None
        commands.append(cmd)
        roles[cmd.instance_id] = cmd.role
        channel.reply(AdminReply(cmd.id, [f"{cmd.instance_id}: decode -> {cmd.role}"]))

    answer = threading.Thread(target=executor, daemon=True)
    answer.start()
    ctl = AdaptiveSplit(cfg, store, channel, roles)
    busy = Load(waiting=3, running=4)

    def publish(t: int) -> None:  # 1 long request a second finished on each decode instance so far
        for iid in [i for i, r in roles.items() if r == "decode"]:
            store.heartbeat(iid, busy if iid == "decode-0" else Load(), rec(t, 400 * t, 20 * t))

    publish(0)
    assert ctl.tick(0.0) is None  # baselines
    publish(10)
    first = ctl.tick(10.0)
    assert first is not None and first.target.prefill == 1 and not commands  # 1 of 2: patience
    publish(20)
    ctl.tick(20.0)
    answer.join(30)
    assert [(c.op, c.instance_id, c.role) for c in commands] == [("set_role", "decode-1", "prefill")]  # least loaded
    assert ctl.counters["changes"] == 1 and roles["decode-1"] == "prefill"
    for t in (30, 40, 50):  # the cooldown: whatever the re-plans say, no further command
        publish(t)
        ctl.tick(float(t))
    assert len(commands) == 1 and ctl.counters["replans"] >= 4
    # ...and the same on the router's metrics endpoint (pdserve/adaptive_metrics.py)
    registry = CollectorRegistry()
    registry.register(AdaptiveCollector(ctl))
    assert registry.get_sample_value("pdserve:adaptive_changes_total") == 1
    assert registry.get_sample_value("pdserve:adaptive_replans_total") == ctl.counters["replans"]
    assert registry.get_sample_value("pdserve:adaptive_change_failures_total") == 0
    assert ctl.last_decision is not None
    assert registry.get_sample_value("pdserve:adaptive_step_slowdown") == ctl.last_decision.slowdown
    assert registry.get_sample_value("pdserve:adaptive_predicted_goodput", {
        "which": "current", "split": ctl.last_decision.current.split.name()}) == ctl.last_decision.current.goodput_rps
    channel.close()


def test_replan_scales_the_profile_by_the_measured_step_time() -> None:
    """Steps measured 3x as long as the profile predicts for the same work: the re-plan runs on a profile 3x
    slower (a busier machine), which pushes a long-prompt workload past what aggregation holds."""
    prof, slo = profile(per_decode_seq_s=0.0005), SLO(2.0, 0.03)
    steps = rec(0, 0, 0, steps=40).work
    predicted = prof.step.predict_sum(40, StepShape(decode_seqs=160, decode_context=16_000))
    slow = WorkloadWindow(100, 0.5, 400, 20, 0.0, dataclasses.replace(steps, seconds=3 * predicted))
    as_profiled = replan(prof, slo, WorkloadWindow(100, 0.5, 400, 20, 0.0, dataclasses.replace(
        steps, seconds=predicted)), Split(0, 2))
    slower = replan(prof, slo, slow, Split(0, 2))
    measured_only = replan(prof, slo, slow, Split(0, 2), calibrate=False)
    unmeasured = replan(prof, slo, WorkloadWindow(100, 0.5, 400, 20, 0.0), Split(0, 2))
    assert as_profiled.slowdown == pytest.approx(1.0) and as_profiled.calibrated
    assert slower.slowdown == pytest.approx(3.0) and slower.calibrated
    assert measured_only.slowdown == pytest.approx(3.0) and not measured_only.calibrated
    assert measured_only.current == pytest.approx(as_profiled.current)
    assert unmeasured.slowdown == 1.0 and not unmeasured.calibrated and unmeasured.current == measured_only.current
    assert slower.current.goodput_rps < as_profiled.current.goodput_rps


def test_each_replan_sets_the_routers_measured_slos_beside_its_prediction(store: MetadataStore, redis_url: str,
                                                                          tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "profile.json"
    profile(per_decode_seq_s=0.0005).save(path)
    cfg = AdaptiveConfig(enabled=True, profile=str(path), slo_ttft_ms=2000, slo_tpot_ms=30, window_s=100,
                         min_requests=5, patience=1000)
    roles = {"decode-0": "decode", "decode-1": "decode"}
    for iid in roles:
        store.register(InstanceInfo(instance_id=iid, role="decode", address=iid, tp_size=1, block_size=16,
                                    num_blocks=100, max_num_seqs=4))
    channel = AdminChannel(redis_url, "adaptive")
    untallied, ctl = AdaptiveSplit(cfg, store, channel, roles), AdaptiveSplit(cfg, store, channel, roles)
    tally = ctl.router_tally()
    assert ctl.router_tally() is tally and (tally.slo_ttft_s, tally.slo_tpot_s) == (2.0, 0.03)

    def publish(t: int) -> None:
        for iid in roles:
            store.heartbeat(iid, Load(), rec(t, 400 * t, 20 * t))

    publish(0)
    assert ctl.tick(0.0) is None and untallied.tick(0.0) is None
    for ttft, tpot in [(0.5, 0.01)] * 3 + [(2.5, 0.01), (0.5, 0.05), (0.5, None)]:
        tally.record(ttft, tpot)  # what the router records as its requests finish
    publish(10)
    with caplog.at_level(logging.INFO, logger="pdserve.adaptive_split"):
        d, plain = ctl.tick(10.0), untallied.tick(10.0)
    assert d is not None and d.measured == MeasuredSlo(SloCounts(6, 5, 5, 4), 10.0)
    assert plain is not None and plain.measured is None
    lines = [r.getMessage() for r in caplog.records if "adaptive split: " in r.getMessage()]
    assert lines[0].endswith("; measured 0.40 req/s in SLO (67% of 6; TTFT met 83%, TPOT met 83%)")
    assert lines[1].endswith("; measured: none (no router in this process)")
    registry, bare = CollectorRegistry(), CollectorRegistry()
    registry.register(AdaptiveCollector(ctl))
    bare.register(AdaptiveCollector(untallied))
    assert registry.get_sample_value("pdserve:adaptive_measured_goodput") == pytest.approx(0.4)
    assert registry.get_sample_value("pdserve:adaptive_measured_attainment") == pytest.approx(4 / 6)
    assert bare.get_sample_value("pdserve:adaptive_measured_goodput") is None
    publish(20)  # a window in which nothing finished at the router
    with caplog.at_level(logging.INFO, logger="pdserve.adaptive_split"):
        quiet = ctl.tick(20.0)
    assert quiet is not None and quiet.measured == MeasuredSlo(SloCounts(6, 5, 5, 4), 20.0)
    channel.close()
