"""The Cluster's placement groups with a real Ray and Redis (CPU, gloo): a TP 2 instance gets a STRICT_PACK group
of 2 bundles with rank 0 in bundle 0 and rank 1 a RankActor in bundle 1; stopping the cluster removes the group
(Ray outlives it here: the test owns Ray); a TP 1 instance gets none; a group no node can hold is refused with
the cluster's free resources in the message."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from pdserve.cluster import Cluster
from pdserve.config import build_config, merge_mappings
from pdserve.tp_groups import GroupNotPlacedError, create_group

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             namespace="tp-groups-test")
    try:
        yield ray
    finally:
        ray.shutdown()


def test_stop_removes_the_group(ray_local: Any, models: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    ray = ray_local
    monkeypatch.setenv("PDSERVE_RUNTIME_DIR", str(tmp_path))  # NOTE: its cluster file, nobody else's
    data = yaml.safe_load((ROOT / "deploy/ray/serving-tiny-cpu.yaml").read_text())
    merge_mappings(data, {"engine": {"model": str(models["llama"])}, "metastore": {"namespace": "tpgroups"},
                          "pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 1, "tensor_parallel_size": 2}}})
    cluster = Cluster(build_config(data))
    try:
        cluster.start_infra()
        cluster.start_pools()
        assert set(cluster.groups) == {"decode-0"}  # prefill-0 is at TP 1: no group
        pg = cluster.groups["decode-0"]
        entry = ray.util.placement_group_table(pg)
        assert entry["strategy"] == "STRICT_PACK" and entry["state"] == "CREATED" and len(entry["bundles"]) == 2
        rank0, rank1 = ray.get(cluster.actors["decode-0"].tp_ranks.remote(), timeout=30)
        assert rank0 != rank1 and rank0 != os.getpid()
    finally:
        cluster.stop()
    assert ray.is_initialized()  # the test's Ray: the cluster did not start it, so it did not stop it
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
    assert cluster.groups == {}


def test_a_group_no_node_can_hold_is_refused(ray_local: Any) -> None:
    with pytest.raises(GroupNotPlacedError, match=r"no node has 2 bundles of \{'GPU': 1.0\}.* free together"):
        create_group("decode-9", 2, gpu=True, resources={}, timeout_s=2)
    assert not [g for g in ray_local.util.placement_group_table().values()
                if g["name"] == "decode-9-tp" and g["state"] != "REMOVED"]
