"""The adaptive P/D split: a thread in the process that owns the pools (`pdserve serve`) that re-plans the split
from the live workload and moves one instance at a time between the pools by a role switch.

Every `adaptive.interval_s` it reads the decode pool's stats records (every request finishes on a decode
instance, prefilled there or not): the requests finished in the last `window_s`, their mean prompt and output
lengths, and the prefix-cache hit rate. From those and the engine profile (`pdserve profile`) it ranks the
splits of the instances it has (planner/plan.py, the same simulation as `pdserve plan`), the current one
included. It changes the split only when the same better split wins `patience` re-plans in a row by at least
`min_gain` predicted goodput, one role switch per change (through the Admin channel, like `pdserve role`: drained,
no request lost), then waits `cooldown_s`. The conditional-disaggregation threshold of the winning split goes to
the runtime policy with it. Every decision is logged; `counters` counts re-plans, changes and failures.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

from metastore import MetadataStore
from metastore.admin import AdminChannel, AdminCommand
from metastore.instance_stats import InstanceStatsRecord
from pdserve.config import AdaptiveConfig
from planner.plan import SLO, SplitPrediction, candidate_splits, poisson_workload
from planner.profile import EngineProfile
from planner.simulate import Split, simulate

log = logging.getLogger(__name__)

SIMULATED_REQUESTS = 300


@dataclass(frozen=True)
class WorkloadWindow:
    requests: int
    rate_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    prefix_hit_rate: float
    decode_step_s: float = 0.0  # the decode pool's measured mean step time (0: none measured)


class WorkloadMeter:
    """Running totals of the decode pool's finished requests, differenced into a sliding window. An instance
    seen for the first time (new, restarted, or just switched into the pool) only sets its baseline."""

    def __init__(self) -> None:
        self.last: dict[str, InstanceStatsRecord] = {}
        # (t, requests, prompt tokens, output tokens, prefix queries, prefix hits, steps, step seconds)
        self.deltas: deque[tuple[float, int, int, int, int, int, int, float]] = deque()

    def observe(self, now: float, records: dict[str, InstanceStatsRecord]) -> None:
        n = prompt = output = queries = hits = steps = 0
        step_s = 0.0
        for iid, rec in records.items():
            before = self.last.get(iid)
            self.last[iid] = rec
            if before is None or rec.requests_finished < before.requests_finished:  # new or restarted
                continue
            n += rec.requests_finished - before.requests_finished
            prompt += rec.prompt_tokens_finished - before.prompt_tokens_finished
            output += rec.output_tokens_finished - before.output_tokens_finished
            queries += rec.prefix_cache_queries - before.prefix_cache_queries
            hits += rec.prefix_cache_hits - before.prefix_cache_hits
            steps += rec.steps - before.steps
            step_s += rec.step_seconds - before.step_seconds
        for iid in set(self.last) - set(records):
            del self.last[iid]
        self.deltas.append((now, n, prompt, output, queries, hits, steps, step_s))

    def window(self, now: float, window_s: float) -> WorkloadWindow | None:
        while self.deltas and self.deltas[0][0] < now - window_s:
            self.deltas.popleft()
        if len(self.deltas) < 2:
            return None
        rows = list(self.deltas)[1:]  # NOTE: the first row is the window's baseline
        n, prompt, output, queries, hits, steps, step_s = (sum(d[i] for d in rows) for i in range(1, 8))
        span = self.deltas[-1][0] - self.deltas[0][0]
        if n == 0 or span <= 0:
            return None
        return WorkloadWindow(int(n), n / span, prompt / n, output / n, hits / queries if queries else 0.0,
                              step_s / steps if steps else 0.0)


@dataclass(frozen=True)
class Decision:
    target: Split
    current: SplitPrediction
    best: SplitPrediction
    slowdown: float  # the decode pool's measured mean step time over the profile's for the same work (1: as profiled)


MAX_SLOWDOWN = 20.0


def replan(profile: EngineProfile, slo: SLO, work: WorkloadWindow, current: Split,
           calibrate: bool = False) -> Decision:
    """The best split of the current instance count for a Poisson workload like `work`, and the current one's
    prediction on the same arrivals. The measured slowdown is the decode pool's mean step time against the
    simulation's for the current split and this workload (clamped to [1 / MAX_SLOWDOWN, MAX_SLOWDOWN]); with
    `calibrate` the profile is scaled by it first. NOTE: off by default: on the tiny CPU cluster the ratio ran to
    its clamp under load (the measured mean and the simulated one do not yet count the same steps), and a plan
    scaled by it saw no split meet the SLOs."""
    uncached = max(1, round(work.mean_prompt_tokens * (1 - work.prefix_hit_rate)))
    arrivals = poisson_workload(work.rate_rps, uncached, max(1, round(work.mean_output_tokens)), SIMULATED_REQUESTS)
    splits = candidate_splits(current.instances, arrivals)
    if current not in splits:
        splits.append(current)
    runs = {s: simulate(profile, s, arrivals) for s in splits}
    simulated = runs[current].decode_step_s
    slowdown = 1.0
    if work.decode_step_s > 0 and simulated > 0:
        slowdown = min(MAX_SLOWDOWN, max(1 / MAX_SLOWDOWN, work.decode_step_s / simulated))
        if calibrate:
            scaled = dataclasses.replace(profile, step=profile.step.scaled(slowdown))
            runs = {s: simulate(scaled, s, arrivals) for s in splits}
    preds = {s: SplitPrediction.of(r, slo) for s, r in runs.items()}
    best = max(preds.values(), key=lambda p: (p.goodput_rps, p.split == current, -p.split.prefill))
    return Decision(best.split, preds[current], best, slowdown)


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
        log.info("adaptive split: %s", dict(self.counters) or "no re-plan")

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

    def current_split(self) -> Split:
        roles = dict(self.roles)
        prefill = sum(r == "prefill" for r in roles.values())
        threshold = self.store.policy().max_local_prefill_tokens if prefill else 0
        return Split(prefill, len(roles) - prefill, threshold)

    def tick(self, now: float, replan_now: bool = True) -> Decision | None:
        decode_ids = [i for i, r in dict(self.roles).items() if r == "decode"]
        self.meter.observe(now, self.store.instance_stats(decode_ids))
        work = self.meter.window(now, self.cfg.window_s)
        if not replan_now or work is None or work.requests < self.cfg.min_requests:
            return None
        current = self.current_split()
        d = replan(self.profile, self.slo, work, current, self.cfg.calibrate_step_time)
        self.last_decision = d
        self.counters["replans"] += 1
        better = d.target != current and d.best.goodput_rps >= (1 + self.cfg.min_gain) * d.current.goodput_rps
        log.info("adaptive split: %.2f req/s, prompt %.0f (hit rate %.0f%%), output %.0f tokens, steps %.2fx the "
                 "profile's: best %s (%.2f req/s in SLO) vs current %s (%.2f)", work.rate_rps,
                 work.mean_prompt_tokens, 100 * work.prefix_hit_rate, work.mean_output_tokens, d.slowdown,
                 d.target.name(), d.best.goodput_rps, current.name(), d.current.goodput_rps)
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
