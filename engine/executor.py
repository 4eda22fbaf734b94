"""Runs work on every TP rank. Rank 0 lives in the engine's process and drives; ranks 1..N-1 are started by a
`RankLauncher` (engine/rank_launcher.py: spawned processes by default, Ray actors in pdserve) and run
`rank_main` (engine/rank_worker.py), which receives each command by broadcast and runs it on the rank's own
`Worker` (their all-reduces pair with the driver's).

Commands are functions of the Worker, never names: `execute(step_input)` (the forward; only rank 0's logits
are used), and the KV connector's worker parts, built on every rank by `attach_kv_workers` and called through
the `KVRanks` it returns (each rank moves its own head slice of the cache)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.kv_connector import KVConnectorSpec, KVConnectorWorker, LayerHook
from engine.model_runner import StepInput
from engine.parallel import destroy_tp, init_tp, rendezvous_store
from engine.rank_launcher import ProcessRankLauncher, RankHandle, RankLauncher
from engine.rank_worker import RemoteError, Worker, broadcast

__all__ = ["Executor", "RankGroup", "Worker"]

log = logging.getLogger(__name__)

R = TypeVar("R")


class Executor:
    """`execute(step_input) -> logits` over all TP ranks, the KV connector's worker parts (`attach_kv_workers`), a
    watch on the other ranks (`watch_ranks`) and `shutdown()`."""

    def __init__(self, config: EngineConfig, launcher: RankLauncher | None = None) -> None:
        self.config = config
        self.size = config.tensor_parallel_size
        self.ranks: list[RankHandle] = []
        self._stopping = threading.Event()
        if self.size > 1:
            launcher = launcher or ProcessRankLauncher()
            host = launcher.rendezvous_host()
            store = rendezvous_store(host, self.size)
            init_method = f"tcp://{host}:{store.port}"
            self.ranks = launcher.start(config, init_method)
            init_tp(0, self.size, init_method, config.device, store)
        self.worker = Worker(config)
        self.runner = self.worker.runner
        self.layer_hook: LayerHook | None = None  # for the next execute only, on rank 0 (engine/kv_connector.py)

    def execute(self, inp: StepInput, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.size > 1:
            assert inp.feed is None, "async scheduling runs at tensor_parallel_size 1 only"
            self._check_ranks()
            broadcast((Worker.execute, (inp,)))
        hook, self.layer_hook = self.layer_hook, None
        return self.runner.execute(inp, prev_tokens, hook)

    def attach_kv_workers(self, spec: KVConnectorSpec) -> RankGroup:
        """Build the KV connector's worker part on every rank; returns the handle that calls them."""
        return RankGroup(self, self._on_every_rank(Worker.attach_kv_worker, spec))

    def _on_every_rank(self, fn: Callable[..., R], *args: Any) -> list[R]:
        """fn(worker, *args) on every rank; results in rank order. A failure on any rank raises RuntimeError
        here after every rank has answered (so the ranks stay in step)."""
        if self.size == 1:
            return [fn(self.worker, *args)]
        self._check_ranks()
        broadcast((fn, args))
        try:
            mine: Any = fn(self.worker, *args)
        except Exception as e:
            mine = RemoteError(f"rank 0: {type(e).__name__}: {e}")
        results: list[Any] = [None] * self.size
        dist.gather_object(mine, results, dst=0)
        errors = [r.message for r in results if isinstance(r, RemoteError)]
        if errors:
            raise RuntimeError("; ".join(errors))
        return results

    def lost_ranks(self) -> list[tuple[int, str]]:
        """(rank, how it ended) of every rank that is no longer running."""
        return [(h.rank, status) for h in self.ranks if (status := h.exit_status()) is not None]

    def _check_ranks(self) -> None:
        if lost := self.lost_ranks():
            raise RuntimeError(f"tensor-parallel rank(s) exited: {', '.join(f'rank {r}: {s}' for r, s in lost)}")

    def watch_ranks(self, on_lost: Callable[[int, str], None], period_s: float = 0.5) -> None:
        """Check the other ranks every `period_s` on a thread of its own, and call `on_lost(rank, how it ended)`
        once, for the first rank found gone before `shutdown` (an idle engine broadcasts nothing, so the step's
        check alone would not see it)."""
        if not self.ranks:
            return

        def watch() -> None:
            while not self._stopping.wait(period_s):
                if lost := self.lost_ranks():
                    if not self._stopping.is_set():
                        on_lost(*lost[0])
                    return

        threading.Thread(target=watch, name="tp-rank-watch", daemon=True).start()

    def shutdown(self) -> None:
        self._stopping.set()
        if self.size > 1 and self.ranks:
            if not self.lost_ranks():
                broadcast(None)
            for h in self.ranks:
                if not h.join(timeout=30):
                    h.kill()
            self.ranks = []
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
