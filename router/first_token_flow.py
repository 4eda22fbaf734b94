"""What a router measures of one instance's flow from admission to first token, for early rejection
(router/admission.py):

    outstanding   prompt tokens it admitted there, per class, whose first token has not come out yet (its
                  prefill queue, the prefills running, the KV hand-off, the wait for a decode slot: every stage
                  a request passes before its first token)
    throughput    the prompt tokens whose first token came out, per second of the time when any admitted
                  request there was still waiting for one: the instance's rate as its requests see it, bounded
                  by whichever stage is slowest (a prefill rate alone misses a decode instance that cannot
                  take the requests as fast as they are prefilled)
    admissions    the prompt tokens admitted per second, per class (the higher classes' share of the rate)

All three are exponentially decayed sums with the time constant WINDOW_S, so recent seconds weigh most and a
measurement fades when nothing new comes. Not thread-safe: the router calls it on its event loop.
"""

from __future__ import annotations

import math

from engine.priority import Priority

WINDOW_S = 5.0  # time constant of every decayed sum here
MIN_BUSY_S = 1.0  # the throughput is not used before this much (decayed) busy time is behind it


def _decay(dt: float) -> float:
    return math.exp(-max(dt, 0.0) / WINDOW_S)


class DecayedRate:
    """Events' sizes per second, exponentially decayed (time constant WINDOW_S)."""

    def __init__(self) -> None:
        self.total, self.at = 0.0, 0.0

    def add(self, n: float, now: float) -> None:
        self.total = self.total_at(now) + n
        self.at = now

    def total_at(self, now: float) -> float:
        """The decayed sum of the sizes."""
        return self.total * _decay(now - self.at)

    def rate(self, now: float) -> float:
        return self.total_at(now) / WINDOW_S


class FirstTokenFlow:
    """One instance's admitted-to-first-token flow, as one router sees it."""

    def __init__(self, now: float) -> None:
        self.outstanding: dict[Priority, int] = {}  # class -> prompt tokens admitted without a first token
        self.requests = 0  # admitted requests without a first token (any class)
        self.answered = DecayedRate()  # prompt tokens of the requests whose first token came out
        self.busy_s = 0.0  # decayed seconds during which `requests` was > 0
        self.at = now
        self.admissions = {p: DecayedRate() for p in Priority}

    def _advance(self, now: float) -> None:
        decay = _decay(now - self.at)
        # NOTE: the busy time since `at`, decayed as it accrued: the integral of exp(-(now - s) / WINDOW_S) ds
        self.busy_s = self.busy_s * decay + (WINDOW_S * (1.0 - decay) if self.requests else 0.0)
        self.at = max(now, self.at)

    def admitted(self, priority: Priority, tokens: int, now: float) -> None:
        self._advance(now)
        self.outstanding[priority] = self.outstanding.get(priority, 0) + tokens
        self.requests += 1
        self.admissions[priority].add(tokens, now)

    def left(self, priority: Priority, tokens: int, now: float, first_token: bool) -> None:
        """An admitted request's first token came out (`first_token`), or it ended without one."""
        self._advance(now)
        self.outstanding[priority] = max(self.outstanding.get(priority, 0) - tokens, 0)
        self.requests = max(self.requests - 1, 0)
        if first_token:
            self.answered.add(tokens, now)

    def ahead(self, priority: Priority) -> int:
        """Outstanding prompt tokens of `priority`'s class or a higher one."""
        return sum(n for p, n in self.outstanding.items() if p <= priority)

    def throughput(self, now: float) -> float | None:
        """Prompt tokens per busy second whose first token came out lately; None before MIN_BUSY_S of it."""
        self._advance(now)
        answered = self.answered.total_at(now)
        if self.busy_s < MIN_BUSY_S or answered <= 0:
            return None
        return answered / self.busy_s

    def admission_rate(self, priority: Priority, now: float) -> float:
        return self.admissions[priority].rate(now)
