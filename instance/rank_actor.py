"""An instance's TP ranks 1..N-1 as Ray actors, one per rank, each in its own bundle of the instance's placement
group (pdserve/cluster.py creates it: `tp` bundles, STRICT_PACK, so one node; the instance's actor, rank 0, is in
bundle 0). Ray schedules and accounts every rank's GPU, and the group restarts as one:

  - the rank actors are created by the instance's actor, so they are its children: when it dies, Ray ends them;
  - when a rank actor dies, rank 0 sees it (Executor.watch_ranks) and ends its own process
    (InstanceActor._exit_for_lost_rank); Ray restarts the instance's actor (max_restarts=-1) in the same group,
    and it starts fresh rank actors.

Each rank actor runs the one rank loop (engine.rank_worker.rank_main) as a long task on one of its threads, so the
actor still answers `pid()` meanwhile; the task's result (None, or the actor's death) is how rank 0 sees the
rank end."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from engine import envs
from engine.config import EngineConfig
from engine.rank_launcher import RankHandle
from engine.rank_worker import rank_main

log = logging.getLogger(__name__)

BUNDLE_CPU = 0.01  # NOTE: a CPU bundle must ask for something for Ray to accept it; on GPU it asks for the GPU


def bundle(gpu: bool, resources: dict[str, float]) -> dict[str, float]:
    """One rank's bundle of the instance's placement group: its GPU (or a token CPU share) and the pool's node
    resource (PoolConfig.actor_resources)."""
    return {("GPU" if gpu else "CPU"): 1.0 if gpu else BUNDLE_CPU, **resources}


class RankActor:
    """TP rank `rank` (>= 1) of `instance_id`."""

    def __init__(self, instance_id: str, rank: int, node_ip: str) -> None:
        # NOTE: a Ray actor's process inherits nothing from rank 0's: what a spawned rank would, it sets here
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ[envs.PDSERVE_NODE_IP.name] = node_ip
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {instance_id} rank {rank} %(name)s: "
                                                       "%(message)s")
        self.instance_id, self.rank = instance_id, rank

    def run(self, config: EngineConfig, init_method: str) -> None:
        """The rank loop, until rank 0 broadcasts shutdown."""
        rank_main(config, self.rank, init_method)

    def pid(self) -> int:
        return os.getpid()


class RayRank:
    """Rank 0's handle on one rank actor: `done` is its `run` task, which ends with the loop or the actor."""

    def __init__(self, rank: int, actor: Any, done: Any) -> None:
        self.rank, self.actor, self.done = rank, actor, done
        self.status: str | None = None  # set once by the launcher's waiter thread (watch_done)

    def exit_status(self) -> str | None:
        # NOTE: an attribute read: rank 0 asks before every step's broadcast, and a ray.wait(timeout=0) costs
        # ~80 us per rank (measured here), a few percent of a GPU decode step at TP 8.
        return self.status

    def settle(self) -> None:
        """Record how `done` ended (it has). NOTE: through its future, not ray.get, which Ray reports as a
        blocking call inside the instance's async actor, from whatever thread."""
        import ray

        e = self.done.future().exception(timeout=30)
        if e is None:
            self.status = "rank loop ended"
        elif isinstance(e, ray.exceptions.RayActorError):
            self.status = f"rank actor died ({type(e).__name__})"
        else:
            self.status = f"rank loop raised {getattr(e, 'cause', None) or e!r}"

    def join(self, timeout: float) -> bool:
        import ray

        ready, _ = ray.wait([self.done], timeout=timeout)
        if ready:
            ray.kill(self.actor, no_restart=True)  # NOTE: its loop is over: give its bundle's GPU back now
        return bool(ready)

    def kill(self) -> None:
        import ray

        log.warning("TP rank %d did not exit; killing its actor", self.rank)
        ray.kill(self.actor, no_restart=True)


def watch_done(ranks: list[RayRank]) -> None:
    """Until every rank's `run` task has ended: wait for the next to end (no polling) and record how."""
    import ray

    pending = {r.done: r for r in ranks}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=None)
        for ref in ready:
            pending.pop(ref).settle()


class RayRankLauncher:
    """Ranks 1..N-1 as RankActors in bundles 1..N-1 of `placement_group` (rank 0, the caller, is in bundle 0);
    each rank actor asks for exactly its bundle."""

    def __init__(self, instance_id: str, placement_group: Any) -> None:
        self.instance_id, self.placement_group = instance_id, placement_group
        self.bundles: list[dict[str, float]] = list(placement_group.bundle_specs)
        self.node_ip = envs.PDSERVE_NODE_IP.get()
        if not self.node_ip:
            raise ValueError("RayRankLauncher: this node's IP is unknown (PDSERVE_NODE_IP is set by the instance's "
                             "Ray actor)")

    @classmethod
    def in_current_group(cls, instance_id: str, tensor_parallel_size: int) -> RayRankLauncher:
        """The launcher for the placement group this actor runs in, which must have one bundle per rank."""
        import ray

        pg = ray.util.get_current_placement_group()
        if pg is None:
            raise ValueError(f"instance {instance_id}: tensor_parallel_size {tensor_parallel_size} needs a placement "
                             "group with one bundle per rank (pdserve/cluster.py makes one per instance); this actor "
                             "runs in none")
        if len(pg.bundle_specs) != tensor_parallel_size:
            raise ValueError(f"instance {instance_id}: its placement group has {len(pg.bundle_specs)} bundles, "
                             f"tensor_parallel_size is {tensor_parallel_size}")
        return cls(instance_id, pg)

    def rendezvous_host(self) -> str:
        # NOTE: the node's address, not loopback: STRICT_PACK keeps the ranks on this node, but nothing here
        # should depend on it.
        return self.node_ip

    def gpus_needed_here(self, tensor_parallel_size: int) -> int:
        return 1  # on GPU, each rank's process sees only its own (its bundle's); unused on CPU

    def start(self, config: EngineConfig, init_method: str) -> list[RankHandle]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ranks: list[RayRank] = []
        for rank in range(1, config.tensor_parallel_size):
            spec = self.bundles[rank]
            # NOTE: max_restarts=0: one rank never restarts alone; the group does (see the module docstring).
            # max_concurrency=2: `run` holds one thread for as long as the loop runs, `pid` gets the other.
            actor = ray.remote(RankActor).options(
                num_cpus=spec.get("CPU", 0), num_gpus=spec.get("GPU", 0),
                resources={k: v for k, v in spec.items() if k not in ("CPU", "GPU")},
                max_concurrency=2, max_restarts=0, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
            ).remote(self.instance_id, rank, self.node_ip)
            ranks.append(RayRank(rank, actor, actor.run.remote(config, init_method)))
        threading.Thread(target=watch_done, args=(ranks,), name="tp-rank-done", daemon=True).start()
        log.info("instance %s: TP ranks 1..%d started as Ray actors in placement group %s", self.instance_id,
                 config.tensor_parallel_size - 1, self.placement_group.id.hex())
        return list(ranks)
