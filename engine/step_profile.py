"""cProfile of an engine's first served steps, one report per step (a diagnostic, off by default).

With `PDSERVE_STEP_PROFILE=N` and `PDSERVE_STEP_TRACE=DIR`, an engine profiles each of its first N steps that
compute tokens after its warm-up and writes `DIR/profile-PID-stepK.txt` (the step's wall time, then its calls
sorted by cumulative and by own time). Steps that compute nothing are profiled and dropped. The reports are
formatted and written by a background thread; the step only enables and disables the profiler.

NOTE: why per step: a fresh instance's first served step has cost several times its later ones on a GPU
(docs/performance.md, "A fresh cluster's first request on one H200"), and only the first one against a later one
says where that time goes. Profiling slows each profiled step; read ratios between them, not their times.
NOTE: on Python 3.12 and later cProfile is built on sys.monitoring, which sees every thread of the process: the
report then also holds what other threads (the KV connector's, Ray's) ran during the step, and their calls can be
nested under the step's own in the cumulative view. A C call's own time there includes waiting for the GIL.
"""

from __future__ import annotations

import cProfile
import io
import logging
import os
import pstats
import threading
from pathlib import Path

from engine import envs

log = logging.getLogger(__name__)

TOP = 40


class StepProfile:
    def __init__(self, directory: str | Path, steps: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.steps, self.written = steps, 0
        self._profile: cProfile.Profile | None = None
        self._threads: list[threading.Thread] = []
        log.info("profiling the first %d served steps to %s (PDSERVE_STEP_PROFILE)", steps, self.directory)

    @staticmethod
    def from_env() -> StepProfile | None:
        steps, directory = envs.PDSERVE_STEP_PROFILE.get(), envs.PDSERVE_STEP_TRACE.get()
        if steps and not directory:
            log.warning("PDSERVE_STEP_PROFILE=%d is ignored: it writes to PDSERVE_STEP_TRACE's directory, unset",
                        steps)
        return StepProfile(directory, steps) if steps and directory else None

    @property
    def active(self) -> bool:
        return self.written < self.steps

    def begin(self) -> None:
        self._profile = cProfile.Profile()
        self._profile.enable()

    def end(self, seconds: float, computed: bool) -> None:
        """Close the step begun last; keep its report when it computed tokens (`seconds`: its wall time)."""
        profile, self._profile = self._profile, None
        if profile is None:
            return
        profile.disable()
        if not computed:
            return
        self.written += 1
        path = self.directory / f"profile-{os.getpid()}-step{self.written}.txt"
        thread = threading.Thread(target=_write, args=(profile, seconds, path), name="step-profile", daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)


def _write(profile: cProfile.Profile, seconds: float, path: Path) -> None:
    out = io.StringIO()
    out.write(f"step wall time {1e3 * seconds:.1f} ms (profiled)\n")
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(TOP)
    stats.sort_stats("tottime").print_stats(TOP)
    try:
        path.write_text(out.getvalue())
    except OSError as e:  # NOTE: a diagnostic: say so, never fail the engine
        log.warning("step profile %s: could not write (%s)", path, e)
