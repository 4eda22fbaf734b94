"""What an engine's steps computed and how long they took, as running totals in the terms of the planner's step
model (planner/step_model.py): prompt tokens and the (query, key) pairs they attend to, decode rows and the
context they attend to. The model is linear, so what a profile predicts for all these steps together is the
model applied to the totals; the adaptive split (pdserve/adaptive_split.py) divides the measured wall time by
that to learn how much slower than profiled this instance's steps run on the live cluster, counting exactly
the same steps on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NOTE: the router reads StepWork from stats records and should not import the scheduler
    from engine.scheduler import SchedulerOutput


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

    def minus(self, before: StepWork) -> StepWork:
        return StepWork(self.steps - before.steps, self.tokens - before.tokens,
                        self.prefill_tokens - before.prefill_tokens, self.prefill_pairs - before.prefill_pairs,
                        self.decode_seqs - before.decode_seqs, self.decode_context - before.decode_context,
                        self.seconds - before.seconds)

    def plus(self, other: StepWork) -> StepWork:
        return StepWork(self.steps + other.steps, self.tokens + other.tokens,
                        self.prefill_tokens + other.prefill_tokens, self.prefill_pairs + other.prefill_pairs,
                        self.decode_seqs + other.decode_seqs, self.decode_context + other.decode_context,
                        self.seconds + other.seconds)


class StepWorkMeter:
    """The engine's running `StepWork`. `shape(out)` before the step runs (it reads how much of each request
    was computed before it), `record(shape, seconds)` after."""

    __slots__ = ("_totals", "seconds")

    def __init__(self) -> None:
        self._totals = [0, 0, 0, 0, 0, 0]  # steps, tokens, prefill tokens, pairs, decode rows, decode context
        self.seconds = 0.0

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
                pairs += k * done + k * (k + 1) // 2
        return out.total_tokens, prefill, pairs, rows, context

    def record(self, shape: tuple[int, int, int, int, int], seconds: float) -> None:
        t = self._totals
        t[0] += 1
        for i, v in enumerate(shape, 1):
            t[i] += v
        self.seconds += seconds

    def totals(self) -> StepWork:
        return StepWork(*self._totals, seconds=self.seconds)
