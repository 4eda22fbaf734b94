"""What an engine's steps computed and how long they took, as running totals in the terms of the planner's step
model (planner/step_model.py): prompt tokens and the (query, key) pairs they attend to, decode rows and the
context they attend to. The model is linear, so what a profile predicts for all these steps together is the
model applied to the totals; the adaptive split (pdserve/adaptive_split.py) divides the measured wall time by
that to learn how much slower than profiled this instance's steps run on the live cluster, counting exactly
the same steps on both sides.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NOTE: the router reads StepWork from stats records and should not import the scheduler
    from engine.scheduler import SchedulerOutput


def chunk_pairs(start: int, length: int) -> int:
    """Attention pairs of a prompt chunk of `length` tokens after `start` cached ones (causal)."""
    return length * start + length * (length + 1) // 2


@dataclass(frozen=True)
class StepWork:
    """Totals over the steps that computed at least one token (counters: subtract two to get a window)."""

    steps: int = 0
    tokens: int = 0  # every token the forwards computed (prompt, recomputed after a preemption, decode)
    prefill_tokens: int = 0  # of those, prompt tokens
    prefill_pairs: int = 0  # (query, key) pairs the prompt tokens attended to (causal, after the cached ones)
    decode_seqs: int = 0  # decode rows (one token each)
    decode_context: int = 0  # tokens the decode rows attended to
    seconds: float = 0.0  # wall time of those steps
    # Of those, the steps after which work remained, so that the serving loop came straight back for the next:
    # how many, their own wall time, and the time from their start to the next step's start (the loop's cycle:
    # the step plus what the loop and the process's other threads took before the next one)
    cycles: int = 0
    cycle_step_seconds: float = 0.0
    cycle_seconds: float = 0.0

    def minus(self, before: StepWork) -> StepWork:
        return StepWork(*(a - b for a, b in zip(astuple(self), astuple(before), strict=True)))

    def plus(self, other: StepWork) -> StepWork:
        return StepWork(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def loop_overhead(self) -> float | None:
        """The loop's cycle over the step, for the steps that had a next one right after (1: no overhead); None
        without any."""
        return self.cycle_seconds / self.cycle_step_seconds if self.cycles and self.cycle_step_seconds > 0 else None


class StepWorkMeter:
    """The engine's running `StepWork`. `shape(out)` before the step runs (it reads how much of each request
    was computed before it), `record(shape, started, seconds, more)` after (`more`: work remains, so the next
    step's start closes this step's cycle)."""

    __slots__ = ("_cycle", "_open", "_totals", "seconds")

    def __init__(self) -> None:
        self._totals = [0, 0, 0, 0, 0, 0]  # steps, tokens, prefill tokens, pairs, decode rows, decode context
        self.seconds = 0.0
        self._cycle: list[float] = [0, 0.0, 0.0]  # cycles, their steps' seconds, their start-to-start seconds
        self._open: tuple[float, float] | None = None

    @staticmethod
    def shape(out: SchedulerOutput) -> tuple[int, int, int, int, int]:
        """(tokens, prefill tokens, prefill pairs, decode rows, decode context) of a scheduled step."""
        prefill = pairs = rows = context = 0
        for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True):
            done, prompt = r.num_computed_tokens, r.num_prompt_tokens
            if done >= prompt:  # a decode row: one token after `done` cached ones
                rows += 1
                context += done + 1
            else:
                k = min(n, prompt - done)
                prefill += k
                pairs += chunk_pairs(done, k)
        return out.total_tokens, prefill, pairs, rows, context

    def step_started(self, t0: float) -> None:
        """A step starts at `t0`: the cycle of the step before it (when work remained after it) ends here."""
        if self._open is not None:
            started, secs = self._open
            c = self._cycle
            c[0] += 1
            c[1] += secs
            c[2] += t0 - started
            self._open = None

    def record(self, shape: tuple[int, int, int, int, int], started: float, seconds: float, more: bool) -> None:
        t = self._totals
        t[0] += 1
        for i, v in enumerate(shape, 1):
            t[i] += v
        self.seconds += seconds
        self._open = (started, seconds) if more else None

    def add_wait(self, seconds: float) -> None:
        """Async scheduling: a step that computed nothing and only waited for the last work step's tokens. Its
        time is the rest of that step's device time (the work step's own record is its launch and the wait for the
        step before it), so it counts with the work: without it an instance between bursts, such as a prefill
        instance taking one prompt at a time, looks faster than its profile. Cycles are unchanged (its start closed
        the last work step's cycle, as any next step's start does)."""
        self.seconds += seconds

    def totals(self) -> StepWork:
        cycles, cycle_step_s, cycle_s = self._cycle
        return StepWork(*self._totals, seconds=self.seconds, cycles=int(cycles), cycle_step_seconds=cycle_step_s,
                        cycle_seconds=cycle_s)
