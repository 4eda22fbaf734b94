"""Async scheduling as a step strategy: launch step n+1, then wait for and emit step n's tokens. The protocol, and
why it is safe, is in engine/inflight.py; the synchronous strategy is engine/stepper.py."""

from __future__ import annotations

import time

import torch

from engine.inflight import InflightStep
from engine.logprobs import LogprobRows
from engine.model_runner import build_step_input
from engine.outputs import RequestOutput
from engine.request import Request
from engine.scheduler import SchedulerOutput
from engine.stepper import Emit, SyncStepper


class AsyncStepper(SyncStepper):
    """Launch this step, then resolve the previous one (the protocol above)."""

    _inflight: InflightStep | None = None

    @property
    def has_inflight(self) -> bool:
        return self._inflight is not None

    def run(self, out: SchedulerOutput, emit: Emit, t0: float) -> list[RequestOutput]:
        prev, self._inflight = self._inflight, None
        sampling: list[Request] = []
        tokens: torch.Tensor | None = None
        logprobs: LogprobRows | None = None
        if len(out):
            inp = build_step_input(out, self.block_size)
            inp.feed = prev.feed(out.requests, inp.query_start_loc) if prev is not None else None
            logits = self.executor.execute(inp, prev.tokens if inp.feed is not None else None)
            sampling = [r for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)
                        if r.num_computed_tokens + n == r.num_tokens]
            if sampling:
                tokens = self.sampler.sample(logits, sampling)  # [N] on the device; nothing waits
                logprobs = self.sampler.logprobs(logits, sampling, tokens)
        outputs: list[RequestOutput] = []
        wait_s = 0.0
        if prev is not None:
            t1 = time.perf_counter()
            values = prev.wait()  # NOTE: the step's one wait for the device, while this step's forward runs
            wait_s = time.perf_counter() - t1
            lps = prev.logprobs.to_host(values) if prev.logprobs is not None else [None] * len(values)
            for request, pending, token, lp in zip(prev.requests, prev.pending, values, lps, strict=True):
                if not request.finished:  # aborted since, or stopped: its row in this step is dropped
                    outputs.append(emit(request, token, pending, lp))
        self.scheduler.update_after_step(out)
        if tokens is not None:
            pending = [not r.finished and not r.finishes_by_length_after_next() for r in sampling]
            for request, p in zip(sampling, pending, strict=True):
                if p:
                    request.append_placeholder()
            self._inflight = InflightStep.launch(sampling, pending, tokens, logprobs)
        if len(out) or prev is not None:
            total = time.perf_counter() - t0
            self.metrics.record_step(total - wait_s, total)
        return outputs
