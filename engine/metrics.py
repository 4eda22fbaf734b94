"""One metrics object per engine: event counters and step timings, read as an immutable snapshot.

Two kinds of count reach a snapshot:
- the engine's own events (`EngineMetrics.count`) and counters it watches (e.g. its model runner's CUDA-graph
  fallbacks, `EngineMetrics.watch(runner.counters)`);
- process-wide kernel fallbacks (`count_fallback`): a kernel module decides once per process, not per engine,
  whether PDL, the fused ops, a skinny-GEMM tile or the auto attention backend can run, so its fallbacks are
  counted here and folded into the snapshot of every engine of the process.

Every fallback is logged where it happens and counted, so that it is visible in `stats()` as well as in logs.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

_fallbacks: Counter[str] = Counter()
_fallbacks_lock = threading.Lock()


def count_fallback(name: str, n: int = 1) -> None:
    """Count a process-wide fallback (the caller logs it). `name` is "<module>_<what>", e.g. "pdl_unsupported"."""
    with _fallbacks_lock:
        _fallbacks[name] += n


def fallback_counts() -> dict[str, int]:
    """The process-wide fallbacks counted so far."""
    with _fallbacks_lock:
        return dict(_fallbacks)


@dataclass(frozen=True)
class MetricsSnapshot:
    """An engine's metrics at one moment: event counts (the engine's, the counters it watches and the
    process-wide fallbacks, summed by name) and step timings since the engine started."""

    counters: dict[str, int]
    steps: int
    host_s: float  # host time of the steps (scheduling, input preparation, output processing)
    total_s: float  # wall time of the steps


class EngineMetrics:
    """Mutable metrics of one engine; `snapshot()` reads them from any thread."""

    __slots__ = ("_lock", "_sources", "counters", "host_s", "steps", "total_s")

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.steps = 0
        self.host_s = 0.0
        self.total_s = 0.0
        self._sources: list[Mapping[str, int]] = []
        # NOTE: counts are rare events; the lock makes a snapshot taken by another thread (an actor's stats())
        # safe against a key being inserted while it copies. record_step stays lock-free (per-step hot path).
        self._lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def record_step(self, host_s: float, total_s: float) -> None:
        self.steps += 1
        self.host_s += host_s
        self.total_s += total_s

    def watch(self, counters: Mapping[str, int]) -> None:
        """Fold `counters` (owned and updated by a component of this engine) into every snapshot."""
        self._sources.append(counters)

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            total: Counter[str] = Counter(self.counters)
        for source in self._sources:
            total.update(dict(source))
        total.update(fallback_counts())
        return MetricsSnapshot(dict(total), self.steps, self.host_s, self.total_s)
