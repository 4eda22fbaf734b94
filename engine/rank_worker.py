"""One TP rank's side: the `Worker` it owns and `rank_main`, the loop that ranks 1..N-1 run, whoever started
their process (engine/rank_launcher.py: spawned processes; instance/rank_actor.py: Ray actors). Rank 0 lives in
the engine's process and drives (engine/executor.py): every command arrives here by broadcast."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.kv_connector import KVConnectorSpec, KVConnectorWorker
from engine.model_runner import ModelRunner, StepInput
from engine.parallel import destroy_tp, init_tp, tp

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


class RemoteError:
    """A command that raised on a rank, sent back to rank 0 (which raises it there)."""

    def __init__(self, message: str) -> None:
        self.message = message


def broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_main(config: EngineConfig, rank: int, init_method: str) -> None:
    """Join the TP group as `rank` (>= 1) and run rank 0's commands until it broadcasts None (shutdown)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    init_tp(rank, config.tensor_parallel_size, init_method, config.device)
    worker = None
    try:
        worker = Worker(config)
        while (cmd := broadcast(None)) is not None:
            fn, args = cmd
            if fn is Worker.execute:  # NOTE: every rank's forward; no result travels back
                worker.execute(*args)
                continue
            try:
                result: Any = fn(worker, *args)
            except Exception as e:  # reported to the driver, which raises it there
                log.exception("rank %d: %s failed", rank, fn.__qualname__)
                result = RemoteError(f"rank {rank}: {type(e).__name__}: {e}")
            dist.gather_object(result, None, dst=0)
    finally:
        if worker is not None:
            worker.shutdown()
        destroy_tp()
