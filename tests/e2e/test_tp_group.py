"""TP groups as Ray actors in a placement group (issue 17, item 3), on the tiny CPU cluster (real Ray, Redis,
NIXL, gRPC; gloo between the ranks): a decode pool at tensor_parallel_size 2 whose rank 1 is a RankActor in bundle
1 of the instance's STRICT_PACK group gives transformers' greedy tokens; a kill -9 of rank 1 under load restarts
the whole group (new rank 0 and rank 1) while every request completes with exact tokens; scaling the pool down
removes the instance's group and scaling it up places a new one."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.serve_process import Server, SlowStreams, serve
from tests.e2e.test_scaling import MAX_TOKENS, PoissonLoad, change
from tests.model_factory import hf_greedy, random_prompts

pytestmark = pytest.mark.slow

P, D = "prefill", "decode"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: dict[str, pathlib.Path]) -> Iterator[Server]:
    edits = {"pools": {"prefill": {"replicas": 1}, "decode": {"replicas": 2, "tensor_parallel_size": 2}},
             "server": {"max_inflight": 128, "breaker_cooldown_s": 2.0, "drain_grace_s": 0.6}}
    with serve(tmp_path_factory.mktemp("tp_group"), models["llama"], edits) as srv:
        yield srv


@pytest.fixture(scope="module")
def ray_driver(server: Server) -> Iterator[Any]:
    """This test process attached to the cluster's Ray (as `pdserve router` attaches), detached before the
    cluster stops."""
    import ray

    run_dir = pathlib.Path(server.env["PDSERVE_RUNTIME_DIR"])
    info = json.loads(next(run_dir.glob("*.json")).read_text())
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address=info["ray_address"], namespace=info["ray_namespace"], log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def groups(ray: Any) -> dict[str, dict[str, Any]]:
    """placement group name -> its entry in Ray's table, for the groups not removed."""
    return {g["name"]: g for g in ray.util.placement_group_table().values() if g["name"] and g["state"] != "REMOVED"}


def tp_pids(ray: Any, iid: str) -> list[int]:
    """The pids of the instance's TP ranks. NOTE: a restarted instance registers (its new pid in the registry,
    which `wait_back` watches) from its constructor, before Ray reports the actor alive; a call in between is
    refused as "restarting", so it is retried."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return ray.get(ray.get_actor(iid).tp_ranks.remote(), timeout=30)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def proc_info(pid: int) -> tuple[int, str]:
    """(parent pid, command line) of a live process."""
    ppid = int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return ppid, pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def is_rank_actor(pid: int) -> bool:
    try:
        return "RankActor" in proc_info(pid)[1]
    except (FileNotFoundError, ProcessLookupError):
        return False


def restart_lines(ray: Any, iid: str) -> list[str]:
    """The log lines in which `iid`'s rank 0 ended its process for its group (Ray's worker logs)."""
    logs = pathlib.Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return [line for f in logs.glob("worker-*.err") for line in f.read_text(errors="replace").splitlines()
            if f"instance {iid}:" in line and "restarts its whole TP group" in line]


def wait_back(server: Server, iid: str, old_pid: int, timeout: float = 90.0) -> None:
    """Until `iid` is registered again by a new process, with the other instances (3 in all)."""
    deadline = time.monotonic() + timeout
    while True:
        live = {i.instance_id: i.pid for i in server.store.live_instances()}
        if live.get(iid, old_pid) != old_pid and len(live) == 3:
            return
        assert time.monotonic() < deadline, f"{iid} not back: {live}"
        time.sleep(0.3)


def metric(server: Server, name: str, instance: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name) and f'instance="{instance}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_tp2_pool_runs_its_ranks_as_ray_actors_with_exact_tokens(server: Server, ray_driver: Any,
                                                                 models: dict[str, pathlib.Path]) -> None:
    ray = ray_driver
    for iid in ("decode-0", "decode-1"):
        g = groups(ray)[f"{iid}-tp"]
        assert g["strategy"] == "STRICT_PACK" and g["state"] == "CREATED", g
        assert len(g["bundles"]) == 2 and all(b.get("CPU") for b in g["bundles"].values()), g
        rank0, rank1 = tp_pids(ray, iid)
        assert rank0 == next(i.pid for i in server.store.live_instances() if i.instance_id == iid)
        ppid, cmdline = proc_info(rank1)
        assert ppid != rank0 and "RankActor" in cmdline, (ppid, rank0, cmdline)  # Ray's worker, not an mp child
    assert "prefill-0-tp" not in groups(ray)  # tensor_parallel_size 1: no group
    prompts = random_prompts(6, [5, 20, 40, 70, 90, 130], 512, seed=1717)  # local and remote prefills
    outs = [server.generate(p, max_tokens=16) for p in prompts]
    for p, out in zip(prompts, outs, strict=True):
        assert [t for r in out for t in r.token_ids] == hf_greedy(models["llama"], p, 16)
    assert any(o[-1].routing.disaggregated for o in outs)


def test_a_tp2_instance_switches_role_and_back_in_place(server: Server, ray_driver: Any,
                                                       models: dict[str, pathlib.Path]) -> None:
    """What the adaptive split does to a TP 2 instance (issue 22's configurations): `pdserve role` turns decode-1
    into a prefill instance under load and back, keeping its rank processes; as prefill it streams a prompt's KV
    from two ranks to decode-0's two, and every output is transformers' greedy tokens."""
    ray, model = ray_driver, models["llama"]
    prompts = random_prompts(6, [40, 70, 90, 130, 20, 60], 512, seed=1818)  # mostly over the 32-token local limit
    references = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    pids = tp_pids(ray, "decode-1")
    load = PoissonLoad(server, prompts, references)
    try:
        change(server, ["role", "decode-1", "prefill"], {"prefill-0": P, "decode-0": D, "decode-1": P})
        prefilled_by = set()
        for i in range(20):  # two prefill instances now: until the placement has used decode-1 for one
            p = random_prompts(1, [100], 512, seed=1900 + i)[0]
            out = server.generate(p, max_tokens=MAX_TOKENS)
            assert [t for r in out for t in r.token_ids] == hf_greedy(model, p, MAX_TOKENS)
            routing = out[-1].routing
            assert routing.disaggregated and routing.decode_instance == "decode-0", routing
            prefilled_by.add(routing.prefill_instance)
            if "decode-1" in prefilled_by:
                break
        assert "decode-1" in prefilled_by, prefilled_by
        change(server, ["role", "decode-1", "decode"], {"prefill-0": P, "decode-0": D, "decode-1": D})
        time.sleep(1.0)  # some load on the final shape
    finally:
        load.stop()
    assert load.failures == [], load.failures
    assert load.mismatches == [], load.mismatches
    assert tp_pids(ray, "decode-1") == pids  # the same rank 0 and rank 1: nothing restarted or reloaded
    assert metric(server, "pdserve:tp_group_restarts_total", "decode-1") == 0


def test_killed_rank_restarts_the_whole_group_and_no_request_fails(server: Server, ray_driver: Any,
                                                                   models: dict[str, pathlib.Path]) -> None:
    ray = ray_driver
    old0, old1 = tp_pids(ray, "decode-0")
    n = 40
    prompts = random_prompts(24, [16 + (i % 8) * 8 for i in range(24)], 512, seed=1818)  # local and remote
    references = [hf_greedy(models["llama"], p, n) for p in prompts]
    streams = SlowStreams(server, prompts, n, delay_s=0.05)  # still in flight when the rank dies
    streams.wait_started()
    os.kill(old1, signal.SIGKILL)
    streams.join()
    assert not streams.errors, streams.errors[:5]
    for i in range(len(prompts)):
        assert streams.received[i] == references[i], f"stream {i}"
    assert all(f is not None and f.finished and f.usage.completion_tokens == n for f in streams.finals)
    assert sum(f.routing.migrations for f in streams.finals if f is not None) >= 1  # some were on decode-0
    wait_back(server, "decode-0", old0)  # the group comes back whole: a new rank 0 and a new rank 1
    new0, new1 = tp_pids(ray, "decode-0")
    assert new0 != old0 and new1 != old1
    assert new0 == next(i.pid for i in server.store.live_instances() if i.instance_id == "decode-0")
    assert not pathlib.Path(f"/proc/{old0}").exists()  # the old rank 0 ended itself
    assert groups(ray)["decode-0-tp"]["state"] == "CREATED"  # the same group, placed again
    lines = restart_lines(ray, "decode-0")
    why = "".join(lines)  # NOTE: gloo may see the peer go before Ray reports the actor's death: either names it
    assert lines and ("TP rank 1 lost" in why or "engine loop failed" in why), lines
    deadline = time.monotonic() + 20
    while metric(server, "pdserve:tp_group_restarts_total", "decode-0") < 1:
        assert time.monotonic() < deadline, "pdserve:tp_group_restarts{instance=decode-0} never reached 1"
        time.sleep(0.5)
    assert metric(server, "pdserve:tp_group_restarts_total", "decode-1") == 0
    out = server.generate(prompts[0], max_tokens=n)  # the restarted group serves
    assert [t for r in out for t in r.token_ids] == references[0]


def test_rank_lost_while_idle_is_seen_by_the_watch(server: Server, ray_driver: Any) -> None:
    """No step runs on an idle decode instance: the executor's watch on its ranks must see the loss."""
    ray = ray_driver
    server.wait_idle()
    old0, old1 = tp_pids(ray, "decode-1")
    os.kill(old1, signal.SIGKILL)
    wait_back(server, "decode-1", old0)
    new0, new1 = tp_pids(ray, "decode-1")
    assert new0 != old0 and new1 != old1
    lines = restart_lines(ray, "decode-1")
    assert any("TP rank 1 lost (rank actor died" in line for line in lines), lines


def test_killed_rank0_takes_its_rank_actors_with_it(server: Server, ray_driver: Any) -> None:
    """The rank actors are the instance actor's children: Ray ends them with it, and the restarted actor starts
    fresh ones in the same group."""
    ray = ray_driver
    server.wait_idle()
    group = groups(ray)["decode-1-tp"]["placement_group_id"]
    old0, old1 = tp_pids(ray, "decode-1")
    os.kill(old0, signal.SIGKILL)
    wait_back(server, "decode-1", old0)
    new0, new1 = tp_pids(ray, "decode-1")
    assert new0 != old0 and new1 != old1
    deadline = time.monotonic() + 30
    while is_rank_actor(old1):
        assert time.monotonic() < deadline, f"the old rank 1 (pid {old1}) outlived its rank 0"
        time.sleep(0.2)
    assert groups(ray)["decode-1-tp"]["placement_group_id"] == group


def test_scale_down_removes_the_group_and_scale_up_places_one(server: Server, ray_driver: Any) -> None:
    ray = ray_driver
    old = groups(ray)["decode-1-tp"]
    change(server, ["scale", "--decode", "1"], {"prefill-0": P, "decode-0": D})
    table = ray.util.placement_group_table()
    assert table[old["placement_group_id"]]["state"] == "REMOVED", table[old["placement_group_id"]]
    change(server, ["scale", "--decode", "2"], {"prefill-0": P, "decode-0": D, "decode-1": D})
    new = groups(ray)["decode-1-tp"]
    assert new["placement_group_id"] != old["placement_group_id"] and new["state"] == "CREATED"
    assert new["strategy"] == "STRICT_PACK" and len(new["bundles"]) == 2
