"""The adaptive P/D split: a thread in the process that owns the pools (`pdserve serve`) that re-plans the split
from the live workload and moves one instance at a time between the pools by a role switch.

Every `adaptive.interval_s` it reads every instance's stats record: from the decode pool's (every request
finishes on a decode instance, prefilled there or not) the requests finished in the last `window_s`, their mean
prompt and output lengths, and the prefix-cache hit rate; from all of them what their steps computed and how
long those steps took, against which the engine profile (`pdserve profile`) is calibrated (`step_slowdown`).
From those it ranks the splits of the instances it has (planner/plan.py, the same simulation as `pdserve
plan`), the current one included. It changes the split only when the same better split wins `patience` re-plans
in a row by at least `min_gain` predicted goodput, one role switch per change (through the Admin channel, like
`pdserve role`: drained, no request lost), then waits `cooldown_s`. The conditional-disaggregation threshold of
the winning split goes to the runtime policy with it. Every decision is logged; `counters` counts re-plans,
changes and failures. Beside each prediction it logs what the router of its process measured over the same
window (requests finished within both SLOs, router/slo_tally.py): the check on the model an operator can watch
(`pdserve:adaptive_measured_goodput`). The decision itself is the model's.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from engine.step_work import StepWork
from metastore import MetadataStore
from metastore.admin import AdminChannel, AdminCommand
from metastore.instance_stats import InstanceStatsRecord
from pdserve.config import AdaptiveConfig
from planner.plan import SLO, SplitPrediction, candidate_splits, poisson_workload
from planner.profile import EngineProfile
from planner.simulate import Split, simulate
from planner.step_model import StepShape
from router.slo_tally import MeasuredSlo, SloTally, SloWindow

log = logging.getLogger(__name__)

SIMULATED_REQUESTS = 300


@dataclass(frozen=True)
class WorkloadWindow:
    requests: int
    rate_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    prefix_hit_rate: float
    work: StepWork = field(default_factory=StepWork)  # every instance's steps in the window, and their wall time


@dataclass(frozen=True)
class _Delta:
    t: float
    requests: int = 0  # finished on the decode pool
    prompt_tokens: int = 0
    output_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    work: StepWork = field(default_factory=StepWork)  # every instance's, both pools


class WorkloadMeter:
    """Running totals of the decode pool's finished requests and of every instance's step work, differenced
    into a sliding window. An instance seen for the first time (new, restarted, or just switched into the
    pool) only sets its baseline."""

    def __init__(self) -> None:
        self.last: dict[str, InstanceStatsRecord] = {}
        self.deltas: deque[_Delta] = deque()

    def observe(self, now: float, records: dict[str, InstanceStatsRecord], decode_ids: set[str]) -> None:
        n = prompt = output = queries = hits = 0
        work = StepWork()
        for iid, rec in records.items():
            before = self.last.get(iid)
            self.last[iid] = rec
            if before is None or rec.requests_finished < before.requests_finished or \
                    rec.work_steps < before.work_steps:  # new or restarted
                continue
            work = work.plus(rec.work.minus(before.work))
            if iid not in decode_ids:
                continue
            n += rec.requests_finished - before.requests_finished
            prompt += rec.prompt_tokens_finished - before.prompt_tokens_finished
            output += rec.output_tokens_finished - before.output_tokens_finished
            queries += rec.prefix_cache_queries - before.prefix_cache_queries
            hits += rec.prefix_cache_hits - before.prefix_cache_hits
        for iid in set(self.last) - set(records):
            del self.last[iid]
        self.deltas.append(_Delta(now, n, prompt, output, queries, hits, work))

    def window(self, now: float, window_s: float) -> WorkloadWindow | None:
        while self.deltas and self.deltas[0].t < now - window_s:
            self.deltas.popleft()
        if len(self.deltas) < 2:
            return None
        rows = list(self.deltas)[1:]  # NOTE: the first row is the window's baseline
        n = sum(d.requests for d in rows)
        span = self.deltas[-1].t - self.deltas[0].t
        if n == 0 or span <= 0:
            return None
        queries = sum(d.prefix_queries for d in rows)
        work = StepWork()
        for d in rows:
            work = work.plus(d.work)
        return WorkloadWindow(n, n / span, sum(d.prompt_tokens for d in rows) / n,
                              sum(d.output_tokens for d in rows) / n,
                              sum(d.prefix_hits for d in rows) / queries if queries else 0.0, work)


@dataclass(frozen=True)
class Decision:
    target: Split
    current: SplitPrediction
    best: SplitPrediction
    slowdown: float  # the instances' measured step time over the profile's for the same steps (1: as profiled)
    calibrated: bool  # whether the plan scaled the profile by it
    loop_overhead: float | None = None  # the serving loop's cycle over its step (logged, not planned with yet)
    measured: MeasuredSlo | None = None  # the router's finished requests against the SLOs in the same window


def measured_words(m: MeasuredSlo | None, tallied: bool) -> str:
    """The log's account of what the router measured in the window, beside the prediction for the current split."""
    if not tallied:
        return "measured: none (no router in this process)"
    if m is None or not m.counts.finished:
        return "measured: no request finished in the window"
    c = m.counts
    return (f"measured {m.goodput_rps:.2f} req/s in SLO ({100 * m.attainment:.0f}% of {c.finished}; TTFT met "
            f"{100 * c.ttft_met / c.finished:.0f}%, TPOT met {100 * c.tpot_met / c.finished:.0f}%)")


MAX_SLOWDOWN = 20.0
MIN_CALIBRATION_STEPS = 20  # fewer measured steps in a window: the profile's step times as they are


def step_slowdown(profile: EngineProfile, work: StepWork) -> float | None:
    """How much longer the steps in `work` took than the profile's step model predicts for exactly those steps,
    clamped to [1 / MAX_SLOWDOWN, MAX_SLOWDOWN]; None with fewer than MIN_CALIBRATION_STEPS steps."""
    if work.steps < MIN_CALIBRATION_STEPS or work.seconds <= 0:
        return None
    shape = StepShape(work.prefill_tokens, work.decode_seqs, work.decode_context, work.prefill_pairs)
    predicted = profile.step.predict_sum(work.steps, shape)
    if predicted <= 0:
        return None
    return min(MAX_SLOWDOWN, max(1 / MAX_SLOWDOWN, work.seconds / predicted))


def replan(profile: EngineProfile, slo: SLO, work: WorkloadWindow, current: Split,
           calibrate: bool = True) -> Decision:
    """The best split of the current instance count for a Poisson workload like `work`, and the current one's
    prediction on the same arrivals. With `calibrate` (and enough measured steps) the profile's step times are
    first scaled by the measured slowdown (`step_slowdown`): the live cluster's steps can run slower than the
    profiled engine's alone (a busy host, the serving loop around the engine), and a plan on the profile's
    times then misjudges which split meets the SLOs."""
    uncached = max(1, round(work.mean_prompt_tokens * (1 - work.prefix_hit_rate)))
    arrivals = poisson_workload(work.rate_rps, uncached, max(1, round(work.mean_output_tokens)), SIMULATED_REQUESTS)
    splits = candidate_splits(current.instances, arrivals)
    if current not in splits:
        splits.append(current)
    measured = step_slowdown(profile, work.work)
    slowdown = measured if measured is not None else 1.0
    scaled = calibrate and measured is not None
    if scaled:
        profile = dataclasses.replace(profile, step=profile.step.scaled(slowdown))
    preds = {s: SplitPrediction.of(simulate(profile, s, arrivals), slo) for s in splits}
    best = max(preds.values(), key=lambda p: (p.goodput_rps, p.split == current, -p.split.prefill))
    return Decision(best.split, preds[current], best, slowdown, scaled, work.work.loop_overhead)


class AdaptiveSplit:
    def __init__(self, cfg: AdaptiveConfig, store: MetadataStore, channel: AdminChannel,
                 roles: dict[str, str]) -> None:
        """`roles`: the cluster's live map instance id -> role (read only here; the admin executor changes it)."""
        assert cfg.profile is not None
        self.cfg, self.store, self.channel, self.roles = cfg, store, channel, roles
        self.profile = EngineProfile.load(cfg.profile)
        self.slo = SLO(cfg.slo_ttft_ms / 1e3, cfg.slo_tpot_ms / 1e3)
        self.meter = WorkloadMeter()
        self.counters: Counter[str] = Counter()  # replans, changes, change_failures, errors
        self.streak: tuple[Split | None, int] = (None, 0)
        self.quiet_until = 0.0
        self.last_decision: Decision | None = None
        # NOTE: fed by the router of this process once attached (router_tally); a controller of several router
        # processes has none, and its re-plans say so
        self.tally: SloTally | None = None
        self.slo_window = SloWindow()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adaptive-split", daemon=True)

    def start(self) -> AdaptiveSplit:
        log.info("adaptive split: on (SLOs TTFT %g ms, TPOT %g ms; re-plan every %g s over %g s; profile %s)",
                 self.cfg.slo_ttft_ms, self.cfg.slo_tpot_ms, self.cfg.interval_s, self.cfg.window_s,
                 self.cfg.profile)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        done = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in sorted(self.counters.items()) if n)
        log.info("adaptive split stopped: %s", done or "no re-plan")

    def _run(self) -> None:
        step = min(self.cfg.interval_s, 2.0)
        next_plan = time.monotonic() + self.cfg.interval_s
        while not self._stop.wait(step):
            try:
                self.tick(time.monotonic(), replan_now=time.monotonic() >= next_plan)
            except Exception:  # NOTE: never end the thread: log, count, go on
                self.counters["errors"] += 1
                log.exception("adaptive split: re-plan failed")
            if time.monotonic() >= next_plan:
                next_plan = time.monotonic() + self.cfg.interval_s

    def router_tally(self) -> SloTally:
        """The tally the router of this process records its finished requests in, against this split's SLOs."""
        if self.tally is None:
            self.tally = SloTally(self.slo.ttft_s, self.slo.tpot_s)
        return self.tally

    def current_split(self) -> Split:
        roles = dict(self.roles)
        prefill = sum(r == "prefill" for r in roles.values())
        threshold = self.store.policy().max_local_prefill_tokens if prefill else 0
        return Split(prefill, len(roles) - prefill, threshold)

    def tick(self, now: float, replan_now: bool = True) -> Decision | None:
        roles = dict(self.roles)
        self.meter.observe(now, self.store.instance_stats(list(roles)), {i for i, r in roles.items() if r == "decode"})
        work = self.meter.window(now, self.cfg.window_s)
        measured = None
        if self.tally is not None:
            self.slo_window.observe(now, self.tally.totals())
            measured = self.slo_window.window(now, self.cfg.window_s)
        if not replan_now or work is None or work.requests < self.cfg.min_requests:
            return None
        current = self.current_split()
        d = dataclasses.replace(replan(self.profile, self.slo, work, current, self.cfg.calibrate_step_time),
                                measured=measured)
        self.last_decision = d
        self.counters["replans"] += 1
        better = d.target != current and d.best.goodput_rps >= (1 + self.cfg.min_gain) * d.current.goodput_rps
        log.info("adaptive split: %.2f req/s, prompt %.0f (hit rate %.0f%%), output %.0f tokens, steps %.2fx the "
                 "profile's%s, loop cycle %s its step: best %s (%.2f req/s in SLO) vs current %s (%.2f); %s",
                 work.rate_rps, work.mean_prompt_tokens, 100 * work.prefix_hit_rate, work.mean_output_tokens,
                 d.slowdown, "" if d.calibrated else " (not applied)",
                 "?" if d.loop_overhead is None else f"{d.loop_overhead:.2f}x", d.target.name(), d.best.goodput_rps,
                 current.name(), d.current.goodput_rps, measured_words(measured, self.tally is not None))
        target, count = self.streak
        self.streak = (d.target, count + 1 if target == d.target else 1) if better else (None, 0)
        if better and self.streak[1] >= self.cfg.patience and now >= self.quiet_until:
            self._move_toward(current, d.target)
            self.streak, self.quiet_until = (None, 0), now + self.cfg.cooldown_s
        return d

    def _move_toward(self, current: Split, target: Split) -> None:
        """One role switch toward `target` (or only the threshold, when the pools already match)."""
        if target.max_local_prefill_tokens != current.max_local_prefill_tokens and target.prefill:
            self.store.set_policy(max_local_prefill_tokens=target.max_local_prefill_tokens)
            log.info("adaptive split: max_local_prefill_tokens %d -> %d", current.max_local_prefill_tokens,
                     target.max_local_prefill_tokens)
        if target.prefill == current.prefill:
            self.counters["changes"] += 1
            return
        src, dst = ("decode", "prefill") if target.prefill > current.prefill else ("prefill", "decode")
        loads = self.store.loads([i for i, r in dict(self.roles).items() if r == src])
        iid = min(loads, key=lambda i: (loads[i].waiting + loads[i].running, i)) if loads else None
        if iid is None:
            self.counters["change_failures"] += 1
            log.warning("adaptive split: no live %s instance to switch to %s", src, dst)
            return
        log.info("adaptive split: switching %s from %s to %s (toward %s)", iid, src, dst, target.name())
        reply = self.channel.call(AdminCommand("set_role", role=dst, instance_id=iid,
                                               deadline=time.time() + 120), timeout_s=150)
        if reply is None or reply.error:
            self.counters["change_failures"] += 1
            log.warning("adaptive split: switching %s to %s failed: %s", iid, dst,
                        "no reply" if reply is None else reply.error)
            return
        self.counters["changes"] += 1
        log.info("adaptive split: %s", "; ".join(reply.changes))


def start_adaptive(cfg: AdaptiveConfig, redis_url: str, namespace: str, store: MetadataStore,
                   roles: dict[str, str]) -> AdaptiveSplit | None:
    """The controller when `adaptive.enabled`, started; None (and one log line) when off."""
    if not cfg.enabled:
        log.info("adaptive split: off (adaptive.enabled: false); the pools keep their sizes unless changed by hand")
        return None
    return AdaptiveSplit(cfg, store, AdminChannel(redis_url, namespace), roles).start()
