"""EngineLoop on its real thread, driving a small scripted engine: commands run on the loop thread and carry their
results or exceptions back; outputs reach their request's sink, which is dropped after the finished output or
when adding the request fails; the idle and after-step hooks run; an engine failure fails every pending command
and every later one with RuntimeError; stop() ends the thread."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from engine.outputs import RequestOutput
from instance.engine_loop import EngineLoop

WAIT = 5.0  # seconds any single future or condition may take


def out(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [1], [token], [token], finished=finished, finish_reason="length" if finished else None)


class ScriptedEngine:
    """Each step returns the next scripted batch of outputs; it has work while batches are left. `fail_at`: the
    step that raises; `gate`: when set, a step waits for it (so a test can queue commands during a step)."""

    def __init__(self) -> None:
        self.batches: collections.deque[list[RequestOutput]] = collections.deque()
        self.steps = 0
        self.fail_at: int | None = None
        self.gate: threading.Event | None = None
        self.in_step = threading.Event()

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        self.in_step.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        if self.steps == self.fail_at:
            raise ValueError("device lost")
        return self.batches.popleft()

    def has_work(self) -> bool:
        return bool(self.batches)


def alive(name: str) -> bool:
    return name in {t.name for t in threading.enumerate()}


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def make_loop(engine: ScriptedEngine) -> Iterator:
    loops: list[EngineLoop] = []

    def make(**kwargs: object) -> EngineLoop:
        loop = EngineLoop(engine.step, engine.has_work, name=f"test-loop-{len(loops)}", **kwargs)  # type: ignore[arg-type]
        loops.append(loop)
        return loop.start()

    yield make
    for i, loop in enumerate(loops):
        loop.stop(WAIT)
        assert not alive(f"test-loop-{i}")


def test_call_runs_on_the_loop_thread_and_returns_results_and_exceptions(make_loop) -> None:
    loop = make_loop()
    assert loop.call(lambda: threading.current_thread().name).result(WAIT) == "test-loop-0"
    assert loop.call(pow, 2, 10).result(WAIT) == 1024

    def refuse() -> None:
        raise KeyError("no such request")

    with pytest.raises(KeyError, match="no such request"):
        loop.call(refuse).result(WAIT)
    assert loop.call(len, "still serving").result(WAIT) == 13  # a failed command does not stop the loop


def test_outputs_reach_their_sink_which_is_dropped_after_the_finished_one(make_loop, engine: ScriptedEngine) -> None:
    got: dict[str, list[RequestOutput]] = {"a": [], "b": []}
    loop = make_loop()
    script = [[out("a", 1), out("b", 10)], [out("a", 2, finished=True), out("b", 11)],
              [out("a", 3), out("b", 12, finished=True)]]  # an output for "a" after its finished one
    threads: set[str] = set()

    def sink(rid: str):
        return lambda o: (threads.add(threading.current_thread().name), got[rid].append(o))

    assert loop.add("b", lambda: None, sink("b")).result(WAIT) is None
    assert loop.add("a", lambda: engine.batches.extend(script) or "queued", sink("a")).result(WAIT) == "queued"
    wait_until(lambda: engine.steps == 3 and not engine.batches, "three steps")
    loop.call(lambda: None).result(WAIT)  # the loop has finished the step that emitted the last outputs
    assert [(o.token_ids[0], o.finished) for o in got["a"]] == [(1, False), (2, True)]
    assert [(o.token_ids[0], o.finished) for o in got["b"]] == [(10, False), (11, False), (12, True)]
    assert threads == {"test-loop-0"}


def test_a_raising_submit_drops_the_sink_and_fails_the_future(make_loop, engine: ScriptedEngine) -> None:
    got: list[RequestOutput] = []
    loop = make_loop()

    def submit() -> None:  # the engine took the request, then the submit failed (e.g. a later check)
        engine.batches.append([out("bad", 7, finished=True)])
        raise ValueError("prompt is empty")

    with pytest.raises(ValueError, match="prompt is empty"):
        loop.add("bad", submit, got.append).result(WAIT)
    wait_until(lambda: not engine.batches, "the step of the refused request")
    loop.call(lambda: None).result(WAIT)
    assert engine.steps == 1 and got == []


def test_idle_and_after_step_hooks(make_loop, engine: ScriptedEngine) -> None:
    idle, after, periodic = threading.Event(), [], []
    engine.batches.extend([[out("x", 1)], [out("x", 2, finished=True)]])
    make_loop(on_idle=idle.set, after_step=lambda: after.append(engine.steps),
              periodic=lambda: periodic.append(time.monotonic()), period_s=0.05)
    assert idle.wait(WAIT)  # the script ran out: the loop is idle
    assert after == [1, 2]
    wait_until(lambda: len(periodic) >= 3, "three periodic calls")
    gaps = [b - a for a, b in itertools.pairwise(list(periodic))]
    assert all(g >= 0.045 for g in gaps), gaps


def test_an_engine_failure_fails_pending_and_later_commands(make_loop, engine: ScriptedEngine) -> None:
    engine.fail_at, engine.gate = 1, threading.Event()
    engine.batches.append([out("x", 1)])
    loop = make_loop()
    assert engine.in_step.wait(WAIT)
    ran: list[int] = []
    pending = loop.call(lambda: ran.append(1))  # queued while the step that will fail is under way
    engine.gate.set()
    with pytest.raises(RuntimeError, match=r"engine loop stopped: ValueError\('device lost'\)"):
        pending.result(WAIT)
    assert ran == [] and isinstance(loop.error, ValueError)
    with pytest.raises(RuntimeError, match="engine loop stopped"):
        loop.call(lambda: ran.append(2)).result(WAIT)
    assert ran == []
    wait_until(lambda: not alive("test-loop-0"), "the loop thread to end")


def test_stop_ends_the_thread_and_commands_left_are_not_run(make_loop, engine: ScriptedEngine) -> None:
    loop = make_loop()
    assert loop.call(lambda: 1).result(WAIT) == 1
    start = time.monotonic()
    loop.stop(WAIT)
    assert not alive("test-loop-0") and time.monotonic() - start < 1.0
    late = loop.call(lambda: 2)
    time.sleep(0.05)
    assert not late.done()  # nothing runs commands any more (the role actors stop the loop last)


def test_setup_runs_on_the_loop_thread_before_any_step_and_its_error_reaches_start(engine: ScriptedEngine) -> None:
    seen: list[tuple[str, int]] = []
    engine.batches.append([out("a", 1, finished=True)])  # work is waiting before the thread starts
    loop = EngineLoop(engine.step, engine.has_work, name="test-loop-setup")
    loop.start(setup=lambda: seen.append((threading.current_thread().name, engine.steps)))
    try:
        assert seen == [("test-loop-setup", 0)]  # on the loop thread, before its first step
        wait_until(lambda: engine.steps == 1, "the step after the setup")
    finally:
        loop.stop(WAIT)

    def fail() -> None:
        raise ValueError("no model")

    broken = EngineLoop(engine.step, engine.has_work, name="test-loop-broken")
    with pytest.raises(ValueError, match="no model"):
        broken.start(setup=fail)
    wait_until(lambda: not alive("test-loop-broken"), "the failed loop's thread to end")
    assert isinstance(broken.error, ValueError)
    assert isinstance(broken.call(lambda: 1).exception(WAIT), RuntimeError)  # calls fail, never hang
