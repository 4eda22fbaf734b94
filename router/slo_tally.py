"""Running totals of the requests a router finished, each checked against one pair of SLOs as the client sees them:
time to first token from the request's arrival at the router, and time per output token over the rest of its
stream (`(last token - first token) / (tokens - 1)`, as `pdserve bench` and `pdserve plan` count it; a one-token
request meets any TPOT). The adaptive split (pdserve/adaptive_split.py) differences them over its window and
sets the measured goodput beside the one it predicted for the split that is serving.

`record` runs on the router's event loop, `totals` in the adaptive split's thread: a lock keeps the four counts
of one snapshot consistent (four integer additions under it, no I/O).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class SloCounts:
    """Requests finished OK, and of them how many met the TTFT SLO, the TPOT SLO, and both."""

    finished: int = 0
    ttft_met: int = 0
    tpot_met: int = 0
    both_met: int = 0

    def minus(self, other: SloCounts) -> SloCounts:
        return SloCounts(self.finished - other.finished, self.ttft_met - other.ttft_met,
                         self.tpot_met - other.tpot_met, self.both_met - other.both_met)


class SloTally:
    def __init__(self, slo_ttft_s: float, slo_tpot_s: float) -> None:
        if slo_ttft_s <= 0 or slo_tpot_s <= 0:
            raise ValueError(f"SLOs must be positive: TTFT {slo_ttft_s} s, TPOT {slo_tpot_s} s")
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self._lock = threading.Lock()
        self._counts = SloCounts()

    def record(self, ttft_s: float, tpot_s: float | None) -> None:
        """One request finished OK: its TTFT, and its TPOT (None: one output token)."""
        ttft_ok = ttft_s <= self.slo_ttft_s
        tpot_ok = tpot_s is None or tpot_s <= self.slo_tpot_s
        with self._lock:
            c = self._counts
            self._counts = SloCounts(c.finished + 1, c.ttft_met + ttft_ok, c.tpot_met + tpot_ok,
                                     c.both_met + (ttft_ok and tpot_ok))

    def totals(self) -> SloCounts:
        with self._lock:
            return self._counts


@dataclass(frozen=True)
class MeasuredSlo:
    """What a window of the tally saw: its counts over `span_s` seconds."""

    counts: SloCounts
    span_s: float

    @property
    def goodput_rps(self) -> float:
        """Requests per second that finished within both SLOs (the planner's goodput, measured)."""
        return self.counts.both_met / self.span_s

    @property
    def attainment(self) -> float:
        return self.counts.both_met / self.counts.finished if self.counts.finished else 0.0


class SloWindow:
    """Snapshots of a tally's totals, differenced over a sliding window (the adaptive split's thread only)."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, SloCounts]] = deque()

    def observe(self, now: float, totals: SloCounts) -> None:
        self.samples.append((now, totals))

    def window(self, now: float, window_s: float) -> MeasuredSlo | None:
        """The counts between the oldest snapshot within `window_s` of `now` and the newest; None before two
        snapshots span any time."""
        while len(self.samples) > 1 and self.samples[0][0] < now - window_s:
            self.samples.popleft()
        if not self.samples:
            return None
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return None
        return MeasuredSlo(last.minus(first), t1 - t0)
