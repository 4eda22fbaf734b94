"""Runs work on every TP rank. Rank 0 lives in the engine's process and drives; ranks 1..N-1 are spawned
processes that receive each command by broadcast and run it on their own `Worker` (their all-reduces pair
with the driver's).

Commands are functions of the Worker, never names: `execute(step_input)` (the forward; only rank 0's logits
are used), and the KV connector's worker parts, built on every rank by `attach_kv_workers` and called through
the `KVRanks` it returns (each rank moves its own head slice of the cache)."""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.kv_connector import KVConnectorSpec, KVConnectorWorker
from engine.model_runner import ModelRunner, StepInput
from engine.parallel import destroy_tp, free_port, init_tp, tp

log = logging.getLogger(__name__)

R = TypeVar("R")


class Worker:
    """Everything one TP rank owns: the model runner (model + KV cache) and the KV connector's worker part."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.rank = tp().rank
        self.runner = ModelRunner(config)
        self.kv_worker: KVConnectorWorker | None = None

    def execute(self, inp: StepInput) -> None:
        self.runner.execute(inp)

    def attach_kv_worker(self, spec: KVConnectorSpec) -> Any:
        """Build this rank's part of the KV connector; returns its `describe()` (plain data for rank 0)."""
        self.kv_worker = spec.make_worker(self.runner.kv_cache, self.config, self.rank)
        return self.kv_worker.describe()

    def call_kv_worker(self, fn: Callable[..., R], *args: Any) -> R:
        assert self.kv_worker is not None, "no KV connector attached"
        return fn(self.kv_worker, *args)

    def shutdown(self) -> None:
        if self.kv_worker is not None:
            self.kv_worker.close()
            self.kv_worker = None
        self.runner.release()


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _worker_main(config: EngineConfig, rank: int, init_method: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    init_tp(rank, config.tensor_parallel_size, init_method, config.device)
    worker = None
    try:
        worker = Worker(config)
        while (cmd := _broadcast(None)) is not None:
            fn, args = cmd
            if fn is Worker.execute:  # NOTE: every rank's forward; no result travels back
                worker.execute(*args)
                continue
            try:
                result: Any = fn(worker, *args)
            except Exception as e:  # reported to the driver, which raises it there
                log.exception("rank %d: %s failed", rank, fn.__qualname__)
                result = _RemoteError(f"rank {rank}: {type(e).__name__}: {e}")
            dist.gather_object(result, None, dst=0)
    finally:
        if worker is not None:
            worker.shutdown()
        destroy_tp()


class _RemoteError:
    def __init__(self, message: str) -> None:
        self.message = message


class Executor:
    """`execute(step_input) -> logits` over all TP ranks, the KV connector's worker parts (`attach_kv_workers`), and
    `shutdown()`."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.size = config.tensor_parallel_size
        self.procs: list[mp.process.BaseProcess] = []
        if self.size > 1:
            init_method = f"tcp://127.0.0.1:{free_port()}"
            ctx = mp.get_context("spawn")
            for rank in range(1, self.size):
                p = ctx.Process(target=_worker_main, args=(config, rank, init_method), daemon=True)
                p.start()
                self.procs.append(p)
            init_tp(0, self.size, init_method, config.device)
        self.worker = Worker(config)
        self.runner = self.worker.runner

    def execute(self, inp: StepInput, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.size > 1:
            assert inp.feed is None, "async scheduling runs at tensor_parallel_size 1 only"
            self._check_workers()
            _broadcast((Worker.execute, (inp,)))
        return self.runner.execute(inp, prev_tokens)

    def attach_kv_workers(self, spec: KVConnectorSpec) -> RankGroup:
        """Build the KV connector's worker part on every rank; returns the handle that calls them."""
        return RankGroup(self, self._on_every_rank(Worker.attach_kv_worker, spec))

    def _on_every_rank(self, fn: Callable[..., R], *args: Any) -> list[R]:
        """fn(worker, *args) on every rank; results in rank order. A failure on any rank raises RuntimeError
        here after every rank has answered (so the ranks stay in step)."""
        if self.size == 1:
            return [fn(self.worker, *args)]
        self._check_workers()
        _broadcast((fn, args))
        try:
            mine: Any = fn(self.worker, *args)
        except Exception as e:
            mine = _RemoteError(f"rank 0: {type(e).__name__}: {e}")
        results: list[Any] = [None] * self.size
        dist.gather_object(mine, results, dst=0)
        errors = [r.message for r in results if isinstance(r, _RemoteError)]
        if errors:
            raise RuntimeError("; ".join(errors))
        return results

    def _check_workers(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker(s) exited (exit codes {[p.exitcode for p in dead]})")

    def shutdown(self) -> None:
        if self.size > 1 and self.procs:
            if all(p.is_alive() for p in self.procs):
                _broadcast(None)
            for p in self.procs:
                p.join(timeout=30)
                if p.is_alive():
                    log.warning("TP worker pid %s did not exit; terminating", p.pid)
                    p.terminate()
            self.procs = []
        self.worker.shutdown()
        if self.size > 1:
            destroy_tp()


class RankGroup:
    """The KV connector's handle on every rank's worker part (engine.kv_connector.KVRanks)."""

    def __init__(self, executor: Executor, descriptors: list[Any]) -> None:
        self._executor = executor
        self.descriptors = descriptors  # each rank's describe(), in rank order

    @property
    def local(self) -> KVConnectorWorker:
        part = self._executor.worker.kv_worker
        assert part is not None
        return part

    def call(self, fn: Callable[..., R], *args: Any) -> list[R]:
        return self._executor._on_every_rank(Worker.call_kv_worker, fn, *args)
