"""SLO-aware early rejection: refuse at once a request that would miss its class's time-to-first-token SLO,
rather than accept it and serve it late (and delay the requests behind it).

    predicted TTFT = the time it already waited in the router's admission queue (router/admission_queue.py,
                     which refuses before that when the queue predicts a wait over the SLO)
                     + the prompt tokens ahead of it on the instance that will prefill it, in its class or a
                       higher one: what this router admitted there whose first token has not come out yet
                       (router/first_token_flow.py), plus its own uncached tokens
                     / the rate at which they drain: the instance's measured throughput to first token (prompt
                       tokens per busy second), less the rate at which this router admits prompt tokens of
                       higher classes there (they arrive after it and go first: a batch request drains only with
                       what interactive arrivals leave, and not at all when they take everything; at least
                       MIN_DRAIN_SHARE)
                     + the recent gap between that prediction and the TTFTs measured in its class on that
                       instance, as its smoothed mean plus GAP_DEVIATIONS smoothed deviations (the SLO is a
                       percentile; the mean alone is missed by half the requests that match it)
                       (what the flow model gets wrong; smoothed, and halving every GAP_HALF_LIFE_S without a
                       new measurement: a class whose requests are all refused measures nothing, and must not
                       stay refused)

Only the classes at or above the request's count: the engines admit by class (engine/scheduler.py), so an
interactive request does not wait behind batch prompts. The throughput counts every stage to the first token
(prefill queue, prefill, KV hand-off, a decode slot), so the slowest one sets it. Until an instance has
MIN_BUSY_S of it, the instance's heartbeats stand in (`computed_tokens / compute_seconds` between two stats
records, smoothed: its prefill rate), and before those `admission.default_tokens_per_s` (a fallback that is
logged and counted: `pdserve:ttft_rate_defaults_total`). A refusal is RESOURCE_EXHAUSTED (HTTP 429), counted
as `pdserve:requests_rejected_total{reason="slo"}`.

NOTE: each router sees only what it placed itself; with several routers the queue is underestimated (by what
the others placed), so a prediction errs towards admitting.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.priority import Priority
from metastore.instance_stats import InstanceStatsRecord
from router.decaying_estimate import DecayingEstimate
from router.first_token_flow import FirstTokenFlow

log = logging.getLogger(__name__)

RATE_SMOOTHING = 0.5  # weight of the newest interval in the smoothed token rate
GAP_SMOOTHING = 0.2  # weight of the newest request in the smoothed gap between predicted and measured TTFT
GAP_HALF_LIFE_S = 2.0  # the gap halves every this long without a new measurement
# The gap predicted is its smoothed mean plus this many smoothed absolute deviations: about the 90th percentile
# of a normal error (mean deviation ~0.8 sigma, p90 at 1.28 sigma), as the SLO is met or missed at a percentile
GAP_DEVIATIONS = 1.6
TPOT_SMOOTHING = 0.2  # weight of the newest finished request in a class's smoothed TPOT on a decode instance
TPOT_HALF_LIFE_S = 5.0  # ...which halves every this long without one
# The least share of an instance's rate a class's queue is predicted to drain at, whatever the higher classes
# take: their arrival rate is an estimate, and a class predicted to drain at zero would be refused outright
MIN_DRAIN_SHARE = 0.05


@dataclass
class TTFTSLOs:
    """The time-to-first-token SLO of each class, in milliseconds."""

    interactive: float = 500.0
    batch: float = 5000.0

    def __post_init__(self) -> None:
        for p in Priority:
            if not getattr(self, p.label) > 0:
                raise ValueError(f"{p.label}: {getattr(self, p.label)} must be > 0 (milliseconds)")

    def of(self, priority: Priority) -> float:
        return float(getattr(self, priority.label))


@dataclass
class AdmissionConfig:
    """The `admission:` section of the serving YAML (docs/configuration.md)."""

    early_reject: bool = False  # refuse a request whose predicted TTFT is over its class's SLO
    ttft_slo_ms: TTFTSLOs = field(default_factory=TTFTSLOs)
    # An instance's token rate until its heartbeats have measured one (tokens per second; err low: it refuses)
    default_tokens_per_s: float = 2000.0
    # The share of each SLO a prediction keeps free: a request is refused when its predicted TTFT is over
    # SLO x (1 - slo_headroom). NOTE: the prediction is a mean; the SLO is met or missed at a percentile
    slo_headroom: float = 0.0
    # With a TPOT SLO (ms; every class), a request is also refused while the TPOT its class has had lately on
    # the decode instance it would use (smoothed mean + GAP_DEVIATIONS deviations) is over it: a request that
    # will miss its TPOT takes prefill and decode time from those that can still meet theirs. None: off
    tpot_slo_ms: float | None = None

    def __post_init__(self) -> None:
        if not self.default_tokens_per_s > 0:
            raise ValueError(f"default_tokens_per_s: {self.default_tokens_per_s} must be > 0")
        if not 0 <= self.slo_headroom < 1:
            raise ValueError(f"slo_headroom: {self.slo_headroom} must be in [0, 1)")
        if self.tpot_slo_ms is not None and not self.tpot_slo_ms > 0:
            raise ValueError(f"tpot_slo_ms: {self.tpot_slo_ms} must be > 0 (milliseconds), or null (off)")

    def budget_ms(self, priority: Priority) -> float:
        """What a request of this class's predicted TTFT may reach before it is refused."""
        return self.ttft_slo_ms.of(priority) * (1 - self.slo_headroom)


@dataclass(frozen=True)
class Prediction:
    ttft_ms: float
    slo_ms: float  # the class's SLO less the headroom (AdmissionConfig.budget_ms)
    queue_ms: float  # the queue's part of ttft_ms (the rest is the measured gap)
    queued_tokens: int  # ahead of it and its own, in its class or higher, on the instance
    tokens_per_s: float  # the instance's throughput to first token (or its prefill rate, or the default)
    measured: bool  # the rate is the instance's (False: admission.default_tokens_per_s)
    waited_ms: float = 0.0  # in the router's admission queue, before it was placed (part of ttft_ms)
    drain_tokens_per_s: float = 0.0  # what the higher classes' admissions leave of tokens_per_s (0: all of it)
    tpot_ms: float = 0.0  # the class's recent TPOT on the decode instance (0: none measured)
    tpot_slo_ms: float | None = None  # admission.tpot_slo_ms

    @property
    def misses_tpot(self) -> bool:
        return self.tpot_slo_ms is not None and self.tpot_ms > self.tpot_slo_ms

    @property
    def misses(self) -> bool:
        return self.ttft_ms > self.slo_ms or self.misses_tpot

    def reason(self, priority: Priority, instance_id: str, decode_id: str = "") -> str:
        if self.ttft_ms <= self.slo_ms and self.misses_tpot:
            return (f"early rejection: the {priority.label} class's time per output token on "
                    f"{decode_id or instance_id} has lately been {self.tpot_ms:.0f} ms, over the TPOT SLO of "
                    f"{self.tpot_slo_ms:g} ms (admission.tpot_slo_ms); retry later")
        rate = f"{self.tokens_per_s:.0f} tokens/s" + ("" if self.measured else " (default, not yet measured)")
        if self.drain_tokens_per_s and self.drain_tokens_per_s < self.tokens_per_s:
            rate += f", {self.drain_tokens_per_s:.0f} of them left by higher classes' arrivals"
        return (f"early rejection: the predicted time to first token is {self.ttft_ms:.0f} ms, over the "
                f"{priority.label} class's budget of {self.slo_ms:g} ms (admission.ttft_slo_ms less "
                f"admission.slo_headroom): {self.queued_tokens}"
                f" prompt tokens queued on {instance_id} at {rate}"
                + (f", after {self.waited_ms:.0f} ms in the admission queue" if self.waited_ms else "")
                + "; retry later")


class TTFTPredictor:
    """Per-instance flows to first token and prefill rates, and the prediction. Not thread-safe: the router calls
    it on its event loop; the records dict it reads is replaced whole by the view's thread."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._last: dict[str, InstanceStatsRecord] = {}  # the record each rate was last updated from
        self.rates: dict[str, float] = {}  # instance -> smoothed prefill tokens per second (heartbeats)
        self.flows: dict[str, FirstTokenFlow] = {}  # instance -> what this router admitted there, to first token
        # (instance, class) -> smoothed (measured TTFT - queue part), ms. NOTE: per class: a batch request also
        # waits for interactive ones that arrive after it, which must not inflate interactive predictions
        self.gaps: dict[tuple[str, Priority], DecayingEstimate] = {}
        self.tpots: dict[tuple[str, Priority], DecayingEstimate] = {}  # (decode instance, class) -> TPOT ms
        self.defaults_used = 0  # predictions made with the default rate (pdserve:ttft_rate_defaults_total)
        self._warned: set[str] = set()

    def observe(self, records: dict[str, InstanceStatsRecord]) -> None:
        """Fold in the stats records' new intervals (cheap when nothing changed: one identity check each)."""
        for iid, rec in records.items():
            last = self._last.get(iid)
            if last is rec:
                continue
            self._last[iid] = rec
            if last is None or rec.compute_seconds < last.compute_seconds:  # first sight, or it restarted
                if rec.compute_seconds > 0 and iid not in self.rates:
                    self.rates[iid] = rec.computed_tokens / rec.compute_seconds
                continue
            dt = rec.compute_seconds - last.compute_seconds
            if dt > 0:
                rate = (rec.computed_tokens - last.computed_tokens) / dt
                old = self.rates.get(iid)
                self.rates[iid] = rate if old is None else RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * old

    def _flow(self, instance_id: str, now: float) -> FirstTokenFlow:
        flow = self.flows.get(instance_id)
        if flow is None:
            flow = self.flows[instance_id] = FirstTokenFlow(now)
        return flow

    def predict(self, instance_id: str, tokens: int, priority: Priority, waited_ms: float = 0.0,
                now: float | None = None, decode_id: str | None = None) -> Prediction:
        """The TTFT of a request of class `priority` with `tokens` prompt tokens to prefill on the instance (and,
        with a TPOT SLO, its class's recent TPOT on `decode_id`, the instance that decodes it)."""
        now = time.monotonic() if now is None else now
        flow = self._flow(instance_id, now)
        rate = flow.throughput(now) or self.rates.get(instance_id)
        measured = rate is not None and rate > 0
        if not measured:
            rate = self.config.default_tokens_per_s
            self.defaults_used += 1
            if instance_id not in self._warned:
                self._warned.add(instance_id)
                log.info("no measured token rate for %s yet: predicting TTFTs with admission.default_tokens_per_s"
                         " %g until it has one", instance_id, rate)
        assert rate is not None
        higher = sum(flow.admission_rate(p, now) for p in Priority if p < priority)
        drain = max(rate - higher, MIN_DRAIN_SHARE * rate)
        queued = flow.ahead(priority) + tokens
        queue_ms = 1000.0 * queued / drain
        ttft = max(waited_ms + queue_ms + self.gap(instance_id, priority, now), waited_ms)
        tpot = self.tpots.get((decode_id or instance_id, priority))
        return Prediction(ttft, self.config.budget_ms(priority), queue_ms, queued, rate, measured, waited_ms, drain,
                          tpot.value(now, GAP_DEVIATIONS) if tpot else 0.0, self.config.tpot_slo_ms)

    def tpot_measured(self, decode_id: str, priority: Priority, tpot_ms: float, now: float | None = None) -> None:
        """A request of class `priority` decoded on `decode_id` finished with this mean time per output token."""
        _fold(self.tpots, (decode_id, priority), TPOT_SMOOTHING, TPOT_HALF_LIFE_S, tpot_ms,
              time.monotonic() if now is None else now)

    def admitted(self, instance_id: str, priority: Priority, tokens: int, now: float | None = None) -> None:
        """A request of class `priority` was admitted with `tokens` prompt tokens to prefill on the instance."""
        now = time.monotonic() if now is None else now
        self._flow(instance_id, now).admitted(priority, tokens, now)

    def abandoned(self, instance_id: str, priority: Priority, tokens: int, now: float | None = None) -> None:
        """An admitted request ended (failed, cancelled) before its first token."""
        now = time.monotonic() if now is None else now
        self._flow(instance_id, now).left(priority, tokens, now, first_token=False)

    def arrival_rate(self, instance_id: str, priority: Priority, now: float | None = None) -> float:
        """Prompt tokens per second of class `priority` admitted to the instance lately (decayed)."""
        flow = self.flows.get(instance_id)
        return flow.admission_rate(priority, time.monotonic() if now is None else now) if flow else 0.0

    def gap(self, instance_id: str, priority: Priority, now: float | None = None) -> float:
        """The gap (ms) to add to the queue's part: smoothed mean + GAP_DEVIATIONS x smoothed deviation,
        decayed by the time since the last measurement."""
        entry = self.gaps.get((instance_id, priority))
        return entry.value(time.monotonic() if now is None else now, GAP_DEVIATIONS) if entry else 0.0

    def measured(self, instance_id: str, priority: Priority, prediction: Prediction, ttft_ms: float,
                 tokens: int = 0, now: float | None = None) -> None:
        """A request of class `priority` with `tokens` prompt tokens to prefill, admitted with `prediction`, had
        its first token after `ttft_ms`: it leaves the flow, and the gap is folded in. NOTE: may be negative (the
        flow model overestimates a lightly loaded instance)."""
        now = time.monotonic() if now is None else now
        self._flow(instance_id, now).left(priority, tokens, now, first_token=True)
        # NOTE: ttft_ms counts from placement, after the wait
        _fold(self.gaps, (instance_id, priority), GAP_SMOOTHING, GAP_HALF_LIFE_S, ttft_ms - prediction.queue_ms, now)


def _fold(table: dict[tuple[str, Priority], DecayingEstimate], key: tuple[str, Priority], smoothing: float,
          half_life_s: float, x: float, now: float) -> None:
    """Add `x` to the estimate at `key`, made on its first value."""
    estimate = table.get(key)
    if estimate is None:
        estimate = table[key] = DecayingEstimate(smoothing, half_life_s)
    estimate.add(x, now)
