"""How a scheduled step runs and its sampled tokens come back. Two strategies, one interface:

    SyncStepper:  launch the forward, wait for its tokens, emit them (this step's outputs)
    AsyncStepper: launch step n+1, then wait for and emit step n's tokens (engine/async_stepper.py)

`run(out, emit, t0)` returns the outputs `emit` made, and records the step's timing in the engine's metrics:
wall time, and the part the host spent outside waiting for the device (schedule, inputs, launches, postprocess).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.executor import Executor
from engine.logprobs import TokenLogprob
from engine.metrics import EngineMetrics
from engine.model_runner import build_step_input
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import Scheduler, SchedulerOutput

# emit(request, token, pending, logprob): append a sampled token (pending: it fills a placeholder) with its logprob
# (None: not asked for), apply the stop rules
Emit = Callable[[Request, int, bool, TokenLogprob | None], RequestOutput]


class SyncStepper:
    def __init__(self, executor: Executor, scheduler: Scheduler, sampler: Sampler, block_size: int,
                 metrics: EngineMetrics) -> None:
        self.executor, self.scheduler, self.sampler = executor, scheduler, sampler
        self.block_size, self.metrics = block_size, metrics

    @property
    def has_inflight(self) -> bool:
        """Whether a launched step's tokens are still to be read (async scheduling only)."""
        return False

    def run(self, out: SchedulerOutput, emit: Emit, t0: float) -> list[RequestOutput]:
        logits = self.executor.execute(build_step_input(out, self.block_size)) if len(out) else None
        self.scheduler.update_after_step(out)
        sampling = [r for r in out.requests if r.num_computed_tokens == r.num_tokens]
        if not sampling:
            return []
        t1 = time.perf_counter()
        sampled = self.sampler.sample(logits, sampling)  # [N]
        logprobs = self.sampler.logprobs(logits, sampling, sampled)
        tokens = sampled.tolist()  # NOTE: the step's one wait for the device
        t2 = time.perf_counter()
        lps = logprobs.to_host(tokens) if logprobs is not None else [None] * len(tokens)
        outputs = [emit(request, token, False, lp) for request, token, lp in zip(sampling, tokens, lps, strict=True)]
        t3 = time.perf_counter()
        self.metrics.record_step((t1 - t0) + (t3 - t2), t3 - t0)
        return outputs
