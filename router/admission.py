"""SLO-aware early rejection: refuse at once a request that would miss its class's time-to-first-token SLO,
rather than accept it and serve it late (and delay the requests behind it).

    predicted TTFT = the time it already waited in the router's admission queue (router/admission_queue.py,
                     which refuses before that when the queue predicts a wait over the SLO)
                     + prompt tokens queued on the instance that will prefill it, in its class or a higher one
                     (this router's placements whose prefill has not finished, its own uncached tokens included)
                     / that instance's measured token rate
                     + the recent gap between that prediction and the TTFTs measured in its class on that
                       instance, as its smoothed mean plus GAP_DEVIATIONS smoothed deviations (the SLO is a
                       percentile; the mean alone is missed by half the requests that match it)
                       (the part the queue does not explain: the KV pull, a decode slot, the first
                       step, and for a lower class the higher-class requests that arrive after it and go
                       first; smoothed, >= 0, and halving every GAP_HALF_LIFE_S without a new measurement:
                       a class whose requests are all refused measures nothing, and must not stay refused)

Only the classes at or above the request's count: the engines admit by class (engine/scheduler.py), so an
interactive request does not wait behind batch prompts. The rate is what the instance's heartbeats report
(`computed_tokens / compute_seconds` between two stats records, smoothed); until an instance has reported
one, `admission.default_tokens_per_s` stands in (a fallback that is logged and counted:
`pdserve:ttft_rate_defaults_total`). A refusal is RESOURCE_EXHAUSTED (HTTP 429), counted as
`pdserve:requests_rejected_total{reason="slo"}`.

NOTE: each router sees only what it placed itself; with several routers the queue is underestimated (by what
the others placed), so a prediction errs towards admitting.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.priority import Priority
from metastore.instance_stats import InstanceStatsRecord

log = logging.getLogger(__name__)

RATE_SMOOTHING = 0.5  # weight of the newest interval in the smoothed token rate
GAP_SMOOTHING = 0.2  # weight of the newest request in the smoothed gap between predicted and measured TTFT
GAP_HALF_LIFE_S = 2.0  # the gap halves every this long without a new measurement
# The gap predicted is its smoothed mean plus this many smoothed absolute deviations: about the 90th percentile
# of a normal error (mean deviation ~0.8 sigma, p90 at 1.28 sigma), as the SLO is met or missed at a percentile
GAP_DEVIATIONS = 1.6


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

    def __post_init__(self) -> None:
        if not self.default_tokens_per_s > 0:
            raise ValueError(f"default_tokens_per_s: {self.default_tokens_per_s} must be > 0")
        if not 0 <= self.slo_headroom < 1:
            raise ValueError(f"slo_headroom: {self.slo_headroom} must be in [0, 1)")

    def budget_ms(self, priority: Priority) -> float:
        """What a request of this class's predicted TTFT may reach before it is refused."""
        return self.ttft_slo_ms.of(priority) * (1 - self.slo_headroom)


@dataclass(frozen=True)
class Prediction:
    ttft_ms: float
    slo_ms: float  # the class's SLO less the headroom (AdmissionConfig.budget_ms)
    queue_ms: float  # the queue's part of ttft_ms (the rest is the measured gap)
    queued_tokens: int  # ahead of it and its own, in its class or higher, on the instance
    tokens_per_s: float
    measured: bool  # the rate is the instance's (False: admission.default_tokens_per_s)
    waited_ms: float = 0.0  # in the router's admission queue, before it was placed (part of ttft_ms)

    @property
    def misses(self) -> bool:
        return self.ttft_ms > self.slo_ms

    def reason(self, priority: Priority, instance_id: str) -> str:
        rate = f"{self.tokens_per_s:.0f} tokens/s" + ("" if self.measured else " (default, not yet measured)")
        return (f"early rejection: the predicted time to first token is {self.ttft_ms:.0f} ms, over the "
                f"{priority.label} class's budget of {self.slo_ms:g} ms (admission.ttft_slo_ms less "
                f"admission.slo_headroom): {self.queued_tokens}"
                f" prompt tokens queued on {instance_id} at {rate}"
                + (f", after {self.waited_ms:.0f} ms in the admission queue" if self.waited_ms else "")
                + "; retry later")


class TTFTPredictor:
    """Per-instance token rates from the stats records, and the prediction. Not thread-safe: the router calls it
    on its event loop; the records dict it reads is replaced whole by the view's thread."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._last: dict[str, InstanceStatsRecord] = {}  # the record each rate was last updated from
        self.rates: dict[str, float] = {}  # instance -> smoothed tokens per second
        # (instance, class) -> smoothed (measured TTFT - queue part), ms, >= 0. NOTE: per class: a batch request
        # also waits for interactive ones that arrive after it, which must not inflate interactive predictions
        # -> (mean gap ms, mean absolute deviation ms, when measured)
        self.gaps: dict[tuple[str, Priority], tuple[float, float, float]] = {}
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

    def predict(self, instance_id: str, queued_tokens: int, priority: Priority,
                waited_ms: float = 0.0) -> Prediction:
        rate = self.rates.get(instance_id)
        measured = rate is not None and rate > 0
        if not measured:
            rate = self.config.default_tokens_per_s
            self.defaults_used += 1
            if instance_id not in self._warned:
                self._warned.add(instance_id)
                log.info("no measured token rate for %s yet: predicting TTFTs with admission.default_tokens_per_s"
                         " %g until its heartbeats report one", instance_id, rate)
        assert rate is not None
        queue_ms = 1000.0 * queued_tokens / rate
        gap = self.gap(instance_id, priority)
        return Prediction(waited_ms + queue_ms + gap, self.config.budget_ms(priority), queue_ms,
                          queued_tokens, rate, measured, waited_ms)

    def gap(self, instance_id: str, priority: Priority, now: float | None = None) -> float:
        """The gap (ms) to add to the queue's part: smoothed mean + GAP_DEVIATIONS x smoothed deviation,
        decayed by the time since the last measurement."""
        mean, dev = self._gap_parts(instance_id, priority, now)
        return mean + GAP_DEVIATIONS * dev

    def _gap_parts(self, instance_id: str, priority: Priority, now: float | None) -> tuple[float, float]:
        entry = self.gaps.get((instance_id, priority))
        if entry is None:
            return 0.0, 0.0
        mean, dev, at = entry
        decay = 0.5 ** (max((time.monotonic() if now is None else now) - at, 0.0) / GAP_HALF_LIFE_S)
        return mean * decay, dev * decay

    def measured(self, instance_id: str, priority: Priority, prediction: Prediction, ttft_ms: float,
                 now: float | None = None) -> None:
        """A request of class `priority` admitted with `prediction` had its first token after `ttft_ms`: fold
        the gap in."""
        now = time.monotonic() if now is None else now
        gap = max(ttft_ms - prediction.queue_ms, 0.0)  # NOTE: ttft_ms counts from placement, after the wait
        key = (instance_id, priority)
        if key not in self.gaps:
            self.gaps[key] = (gap, 0.0, now)
            return
        mean, dev = self._gap_parts(instance_id, priority, now)
        self.gaps[key] = (GAP_SMOOTHING * gap + (1 - GAP_SMOOTHING) * mean,
                          GAP_SMOOTHING * abs(gap - mean) + (1 - GAP_SMOOTHING) * dev, now)
