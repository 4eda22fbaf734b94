"""An engine's work steps one by one, as JSON lines, for finding where serving time goes (off by default).

With `PDSERVE_STEP_TRACE=DIR` every engine writes `DIR/steps-PID.jsonl`: a header line, then one line per step
that computed a token: its start (Unix time, comparable across the processes of one host), its wall time, the
part of it spent polling the KV connector, and its shape in the planner's terms (engine/step_work.py). The step
only appends a tuple to a deque; a background thread writes the lines every `FLUSH_S` (no I/O on the step
loop), so a process killed outright loses its last fraction of a second. `bench/step_trace_report.py` sets the
steps beside a profile's prediction for each.

NOTE: why per step, when StepWork already totals them: a single slowdown over all steps hides how it grows with
the batch. On the 2-core dev machine a serving decode step took 1.12x the profile's prediction with one row and
1.9x with eight (docs/performance.md, "Where a served step's time goes"), and the SLO is broken at the large
batches.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path

from engine import envs

log = logging.getLogger(__name__)

FLUSH_S = 0.5
FIELDS = ("start_unix_s", "seconds", "poll_seconds", "tokens", "prefill_tokens", "prefill_pairs", "decode_rows",
          "decode_context")


class StepTrace:
    def __init__(self, directory: str | Path, header: dict[str, object]) -> None:
        """Start writing to `directory`/steps-PID.jsonl (created; appended to if it exists). `header`: what the
        first line says of this engine (its role's connector, the model)."""
        self.path = Path(directory) / f"steps-{os.getpid()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._file.write(json.dumps({"pid": os.getpid(), "fields": FIELDS, **header}) + "\n")
        self._file.flush()
        self._wall = time.time() - time.perf_counter()  # perf_counter -> Unix time
        self._rows: collections.deque[tuple[float, ...]] = collections.deque()
        self.written = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-trace", daemon=True)
        self._thread.start()
        log.info("tracing every engine step to %s (PDSERVE_STEP_TRACE)", self.path)

    @staticmethod
    def from_env(header: dict[str, object]) -> StepTrace | None:
        directory = envs.PDSERVE_STEP_TRACE.get()
        return StepTrace(directory, header) if directory else None

    def record(self, started: float, seconds: float, poll_seconds: float,
               shape: tuple[int, int, int, int, int]) -> None:
        """A step that began at perf_counter() `started`; `shape` as StepWorkMeter.shape gives it."""
        self._rows.append((self._wall + started, seconds, poll_seconds, *shape))

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        lines = []
        while self._rows:
            lines.append(json.dumps(self._rows.popleft()))
        if not lines or self._file.closed:
            return
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
            self.written += len(lines)
        except OSError as e:  # NOTE: tracing is a diagnostic: say so and stop, never fail the engine
            self.errors += 1
            log.warning("step trace %s: could not write (%s); tracing stops", self.path, e)
            self._stop.set()
            self._file.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not self._file.closed:
            self._file.close()
