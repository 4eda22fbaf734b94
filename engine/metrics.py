"""Placeholder of the engine metrics object (the full version lands with the config/metrics change)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricsSnapshot:
    counters: dict[str, int]
    steps: int
    host_s: float
    total_s: float


class EngineMetrics:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.steps = 0
        self.host_s = 0.0
        self.total_s = 0.0

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def record_step(self, host_s: float, total_s: float) -> None:
        self.steps += 1
        self.host_s += host_s
        self.total_s += total_s

    def snapshot(self) -> MetricsSnapshot:
        return MetricsSnapshot(dict(self.counters), self.steps, self.host_s, self.total_s)
