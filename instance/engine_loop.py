"""Drives an engine on a background thread, so a server (the role actors) can talk to it concurrently.

The engine is not thread-safe: every command runs on the loop thread, between steps (`call` returns a
Future). Outputs go to per-request sinks registered with `add`, called on the loop thread; a sink must not
block (hand the output to an asyncio loop or a queue).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from engine.outputs import RequestOutput

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


class EngineLoop:
    def __init__(self, step: Callable[[], Sequence[RequestOutput]], has_work: Callable[[], bool],
                 on_idle: Callable[[], None] | None = None, periodic: Callable[[], None] | None = None,
                 after_step: Callable[[], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None,
                 period_s: float = 0.5, idle_wait_s: float = 0.001, name: str = "engine-loop") -> None:
        """`step` advances the engine one iteration; `on_idle` runs when there is no work (e.g. the prefill
        role's engine step, which serves KV release messages); `periodic` runs every `period_s` (e.g. heartbeats
        with the load); `after_step` runs after every step (e.g. publishing KV events while they are fresh);
        `on_failure` runs first when the loop fails (e.g. ending a TP group's process before the pending calls
        get the error)."""
        self._step, self._has_work, self._on_idle, self._periodic = step, has_work, on_idle, periodic
        self._after_step, self._on_failure = after_step, on_failure
        self.period_s, self.idle_wait_s = period_s, idle_wait_s
        self._commands: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = \
            queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._setup: tuple[Callable[[], None], Future[None]] | None = None
        self.error: BaseException | None = None

    def start(self, setup: Callable[[], None] | None = None) -> EngineLoop:
        """Start the thread. `setup` runs on it first, before any step or command, and this returns when it has
        (re-raising what it raised: the thread then ends without looping). NOTE: for what must happen on the
        thread that steps the engine: PyTorch keeps some GPU caches per thread (cuDNN's attention plans), so an
        engine warmed up on another thread builds them again while serving."""
        if setup is None:
            self._thread.start()
            return self
        done: Future[None] = Future()
        self._setup = (setup, done)
        self._thread.start()
        done.result()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run fn(*args) on the loop thread; the Future carries its result or exception."""
        fut: Future[Any] = Future()
        if self.error is not None:
            fut.set_exception(RuntimeError(f"engine loop stopped: {self.error!r}"))
        else:
            self._commands.put((fn, args, fut))
        return fut

    def add(self, request_id: str, submit: Callable[[], Any], sink: Sink) -> Future[Any]:
        """Register `sink` for `request_id` and run `submit()` (which adds the request to the engine) on the
        loop thread. If submit raises (bad input), the sink is dropped and the Future carries the error."""
        def run() -> Any:
            self._sinks[request_id] = sink
            try:
                return submit()
            except BaseException:
                self._sinks.pop(request_id, None)
                raise

        return self.call(run)

    @property
    def thread_name(self) -> str:
        return self._thread.name

    def _run(self) -> None:
        import time

        if self._setup is not None:
            setup, done = self._setup
            try:
                setup()
            except BaseException as e:
                self.error = e
                done.set_exception(e)
                return
            done.set_result(None)
        next_periodic = 0.0
        try:
            while not self._stop.is_set():
                self._drain()
                if self._has_work():
                    for out in self._step():
                        sink = self._sinks.get(out.request_id)
                        if out.finished:
                            self._sinks.pop(out.request_id, None)
                        if sink is not None:
                            sink(out)
                    if self._after_step is not None:
                        self._after_step()
                elif self._on_idle is not None:
                    self._on_idle()
                now = time.monotonic()
                if self._periodic is not None and now >= next_periodic:
                    next_periodic = now + self.period_s
                    self._periodic()
                if not self._has_work():
                    try:  # sleep until a command arrives (or the idle period passes)
                        fn, args, fut = self._commands.get(timeout=self.idle_wait_s)
                        self._run_one(fn, args, fut)
                    except queue.Empty:
                        pass
        except BaseException as e:  # an engine failure: fail every pending command, keep the error visible
            log.exception("engine loop failed")
            self.error = e
            if self._on_failure is not None:
                self._on_failure(e)
            self._drain(RuntimeError(f"engine loop stopped: {e!r}"))

    def _drain(self, error: BaseException | None = None) -> None:
        while True:
            try:
                fn, args, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if error is not None:
                fut.set_exception(error)
            else:
                self._run_one(fn, args, fut)

    @staticmethod
    def _run_one(fn: Callable[..., Any], args: tuple[Any, ...], fut: Future[Any]) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)
