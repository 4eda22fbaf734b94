"""A smoothed measurement that fades: the exponentially smoothed mean and mean absolute deviation of a series
(e.g. the error of a TTFT prediction, or the TPOT of a class's requests), both halving every `half_life_s` without
a new value. Early rejection (router/admission.py) predicts with mean + k deviations; the fading is what lets a
class whose requests are all refused (so nothing new is measured) be admitted again."""

from __future__ import annotations


class DecayingEstimate:
    def __init__(self, smoothing: float, half_life_s: float) -> None:
        self.smoothing, self.half_life_s = smoothing, half_life_s
        self.mean, self.dev, self.at = 0.0, 0.0, 0.0
        self.seen = False

    def parts(self, now: float) -> tuple[float, float]:
        """(mean, deviation), decayed to `now`; (0, 0) before the first value."""
        if not self.seen:
            return 0.0, 0.0
        decay = 0.5 ** (max(now - self.at, 0.0) / self.half_life_s)
        return self.mean * decay, self.dev * decay

    def value(self, now: float, deviations: float) -> float:
        mean, dev = self.parts(now)
        return mean + deviations * dev

    def add(self, x: float, now: float) -> None:
        if not self.seen:
            self.mean, self.dev, self.at, self.seen = x, 0.0, now, True
            return
        mean, dev = self.parts(now)
        a = self.smoothing
        self.mean, self.dev, self.at = a * x + (1 - a) * mean, a * abs(x - mean) + (1 - a) * dev, now
