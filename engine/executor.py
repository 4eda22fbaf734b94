"""Runs the model on every TP rank. Rank 0 lives in the engine's process and drives; ranks 1..N-1 are spawned
processes that receive each step's StepInput by broadcast and run the same forward (their all-reduces pair
with the driver's)."""

from __future__ import annotations

import logging
import multiprocessing as mp

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.model_runner import ModelRunner, StepInput
from engine.parallel import destroy_tp, free_port, init_tp

log = logging.getLogger(__name__)


def _broadcast(obj: StepInput | None) -> StepInput | None:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _worker_main(config: EngineConfig, rank: int, init_method: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    init_tp(rank, config.tensor_parallel_size, init_method, config.device)
    try:
        runner = ModelRunner(config)
        while (inp := _broadcast(None)) is not None:
            runner.execute(inp)
    finally:
        destroy_tp()


class Executor:
    """`execute(step_input) -> logits` over all TP ranks; `shutdown()` stops the workers."""

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
        self.runner = ModelRunner(config)

    def execute(self, inp: StepInput) -> torch.Tensor:
        if self.size > 1:
            self._check_workers()
            _broadcast(inp)
        return self.runner.execute(inp)

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
            destroy_tp()
