"""Hands engine outputs from the loop thread to the decode actor's per-request asyncio streams.

NOTE: a loaded decode instance emits one output per running request per step (64 requests at ~7 ms a step is
~9,000 a second), and each used to cost its own wake-up of the actor's event loop and its own Ray stream item
and gRPC message. Here a step's outputs cost one wake-up, and a stream whose consumer lags sends what piled up
as one item: the tokens arrive in order, a few per message, instead of the lag growing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from engine.logprobs import TokenLogprob
from engine.outputs import RequestOutput

OutputQueue = asyncio.Queue[RequestOutput]


class StepMailbox:
    """Collects outputs put from any thread and delivers them on `loop`, at most one wake-up in flight.
    Outputs for one queue are delivered in the order they were put."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[OutputQueue, RequestOutput]] = []
        self._scheduled = False
        self.wakeups = 0

    def sink(self, outputs: OutputQueue) -> Callable[[RequestOutput], None]:
        """A sink for EngineLoop.add that feeds `outputs` (consumed on `loop`)."""
        def put(out: RequestOutput) -> None:
            with self._lock:
                self._pending.append((outputs, out))
                if self._scheduled:
                    return
                self._scheduled = True
                self.wakeups += 1
            self._loop.call_soon_threadsafe(self._deliver)

        return put

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for outputs, out in pending:
            outputs.put_nowait(out)


async def next_outputs(outputs: OutputQueue) -> tuple[RequestOutput, list[int], int,
                                                      list[TokenLogprob | None] | None]:
    """Wait for the next output, then take the ones already queued behind it (up to the final one).

    Returns the latest output (its text, finish state and counters are cumulative), every new token id in
    order, how many outputs were merged (1 when the consumer keeps up), and the new tokens' logprobs (one per
    token; None when the request did not ask for them)."""
    out = await outputs.get()
    tokens = list(out.new_token_ids)
    logprobs = _logprobs_of(out)
    merged = 1
    while not out.finished and not outputs.empty():
        out = outputs.get_nowait()
        tokens += out.new_token_ids
        if logprobs is not None:
            logprobs += _logprobs_of(out) or []
        merged += 1
    return out, tokens, merged, logprobs


def _logprobs_of(out: RequestOutput) -> list[TokenLogprob | None] | None:
    return list(out.new_logprobs) if out.new_logprobs is not None else None
