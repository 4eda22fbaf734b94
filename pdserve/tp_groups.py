"""The placement group of each tensor-parallel instance (tensor_parallel_size > 1): one bundle per rank, STRICT_PACK
(every rank on one node: the group's all-reduces stay on NVLink), each bundle one GPU (on CPU a token CPU share,
so that Ray accepts it) plus the pool's node resource when it has one. The instance's actor (rank 0) takes bundle
0 and starts ranks 1..N-1 as Ray actors in the others (instance/rank_actor.py). The group outlives its actors'
restarts (Ray restarts the instance's actor in bundle 0, and it starts fresh ranks) and goes with the instance:
`Cluster` removes it when the instance is removed (scale down, drain, stop)."""

from __future__ import annotations

import logging
from typing import Any

from instance.rank_actor import bundle

log = logging.getLogger(__name__)

STRATEGY = "STRICT_PACK"
READY_TIMEOUT_S = 120.0  # the group's resources must be free within this long


class GroupNotPlacedError(RuntimeError):
    """The cluster has no node with the group's resources free (every rank's GPU on one node)."""


def create_group(instance_id: str, tensor_parallel_size: int, gpu: bool, resources: dict[str, float],
                 timeout_s: float = READY_TIMEOUT_S) -> Any:
    """Reserve the instance's group (a ray PlacementGroup) and wait until Ray has placed it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [bundle(gpu, resources) for _ in range(tensor_parallel_size)]
    pg = placement_group(bundles, strategy=STRATEGY, name=f"{instance_id}-tp")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise GroupNotPlacedError(
            f"instance {instance_id}: no node has {tensor_parallel_size} bundles of {bundles[0]} free together "
            f"({STRATEGY}) within {timeout_s:g} s; the cluster has {ray.available_resources()} free") from None
    log.info("instance %s: placement group %s placed (%d x %s, %s)", instance_id, pg.id.hex(),
             tensor_parallel_size, bundles[0], STRATEGY)
    return pg


def remove_group(instance_id: str, pg: Any) -> None:
    """Give the group's resources back (any actor still in it ends)."""
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
        log.info("instance %s: placement group %s removed", instance_id, pg.id.hex())
    except Exception as e:  # NOTE: the stop goes on; a group left behind is visible in `ray status`
        log.warning("instance %s: could not remove placement group %s (%s)", instance_id, pg.id.hex(), e)
