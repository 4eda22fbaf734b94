"""How the TP ranks 1..N-1 of an engine are started: one small interface, so that the engine does not care who
owns their processes. `ProcessRankLauncher` (the default, for a plain `LLM(...)`) spawns them next to the
engine's process; pdserve's instances start them as Ray actors in the instance's placement group
(instance/rank_actor.py). Whatever starts them, every rank runs `engine.rank_worker.rank_main`."""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Protocol

from engine.config import EngineConfig
from engine.rank_worker import rank_main

log = logging.getLogger(__name__)


class RankHandle(Protocol):
    """One started rank (>= 1), as rank 0 sees it."""

    rank: int

    def exit_status(self) -> str | None:
        """None while the rank runs; else how it ended, in words (e.g. "exit code -9"). Cheap: the executor
        asks before every broadcast."""
        ...

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the rank to end (after rank 0 broadcast shutdown); True if it did."""
        ...

    def kill(self) -> None:
        """End the rank now (one that did not exit after shutdown)."""
        ...


class RankLauncher(Protocol):
    def rendezvous_host(self) -> str:
        """The address every rank reaches rank 0's process at (the TCP rendezvous of torch.distributed)."""
        ...

    def gpus_needed_here(self, tensor_parallel_size: int) -> int:
        """How many GPUs the engine's own process must see: every rank's when the ranks share its devices, one
        when each rank's process is given its own (EngineConfig.resolved checks it)."""
        ...

    def start(self, config: EngineConfig, init_method: str) -> list[RankHandle]:
        """Start ranks 1..tensor_parallel_size-1, each running `rank_main(config, rank, init_method)`; returns
        their handles in rank order. Rank 0 joins the group after this returns."""
        ...


class ProcessRank:
    def __init__(self, rank: int, proc: mp.process.BaseProcess) -> None:
        self.rank, self.proc = rank, proc

    def exit_status(self) -> str | None:
        return None if self.proc.is_alive() else f"exit code {self.proc.exitcode}"

    def join(self, timeout: float) -> bool:
        self.proc.join(timeout)
        return not self.proc.is_alive()

    def kill(self) -> None:
        log.warning("TP rank %d (pid %s) did not exit; terminating it", self.rank, self.proc.pid)
        self.proc.terminate()


class ProcessRankLauncher:
    """Ranks as spawned child processes of the engine's process, on the same machine and its visible GPUs
    (rank r takes cuda:r, engine/parallel.py)."""

    def rendezvous_host(self) -> str:
        return "127.0.0.1"  # NOTE: every rank is a child of this process, on this machine

    def gpus_needed_here(self, tensor_parallel_size: int) -> int:
        return tensor_parallel_size

    def start(self, config: EngineConfig, init_method: str) -> list[RankHandle]:
        ctx = mp.get_context("spawn")
        handles: list[RankHandle] = []
        for rank in range(1, config.tensor_parallel_size):
            p = ctx.Process(target=rank_main, args=(config, rank, init_method), daemon=True)
            p.start()
            handles.append(ProcessRank(rank, p))
        return handles
