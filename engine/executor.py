"""Runs work on every TP rank. Rank 0 lives in the engine's process and drives; ranks 1..N-1 are spawned
processes that receive each command by broadcast and run it on their own `Worker` (their all-reduces pair
with the driver's).

Two kinds of command: `execute(step_input)` (the forward; only rank 0's logits are used) and
`collective_rpc(method, *args)`, which calls `Worker.<method>(*args)` on every rank and returns the results
in rank order (used by the KV transfer, where each rank moves its own head slice of the cache)."""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.model_runner import ModelRunner, StepInput
from engine.parallel import destroy_tp, free_port, init_tp, tp

log = logging.getLogger(__name__)

_EXECUTE = "__execute__"


class Worker:
    """Everything one TP rank owns: the model runner (model + KV cache) and optional per-rank extensions
    (e.g. the KV transfer agent), attached by name through `attach`."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.rank = tp().rank
        self.runner = ModelRunner(config)
        self.extensions: dict[str, Any] = {}

    def attach(self, name: str, factory: Any, *args: Any) -> Any:
        """Build `factory(worker, *args)` on this rank and keep it as extension `name`; returns what
        `describe()` of it returns, if it has one (plain data, so it can travel back to rank 0)."""
        ext = factory(self, *args)
        self.extensions[name] = ext
        return ext.describe() if hasattr(ext, "describe") else None

    def call(self, name: str, method: str, *args: Any) -> Any:
        return getattr(self.extensions[name], method)(*args)

    def shutdown(self) -> None:
        for ext in self.extensions.values():
            if hasattr(ext, "close"):
                ext.close()
        self.extensions.clear()
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
            method, args = cmd
            if method == _EXECUTE:
                worker.runner.execute(args)
                continue
            try:
                result: Any = getattr(worker, method)(*args)
            except Exception as e:  # reported to the driver, which raises it there
                log.exception("rank %d: %s failed", rank, method)
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
    """`execute(step_input) -> logits` and `collective_rpc(...)` over all TP ranks; `shutdown()` stops them."""

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
            _broadcast((_EXECUTE, inp))
        return self.runner.execute(inp, prev_tokens)

    def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call `Worker.<method>(*args)` on every rank; results in rank order. A failure on any rank raises
        RuntimeError here after every rank has answered (so the ranks stay in step)."""
        if self.size == 1:
            return [getattr(self.worker, method)(*args)]
        self._check_workers()
        _broadcast((method, args))
        try:
            mine: Any = getattr(self.worker, method)(*args)
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
