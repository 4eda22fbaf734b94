"""`ray up` of a head and a worker node: deploy/ray/cluster.yaml with `provider.head_ip` and `worker_ips` set to two
network namespaces of this machine (tests/e2e/netns.py: A 10.78.0.1, B 10.78.0.2), each running its own sshd on its
link address. `ray up` itself runs inside A, so every SSH connection crosses into the namespaces: `ray up` to the
head (A), then the head's autoscaler to the worker (B), which it brings up with `worker_start_ray_commands`. Then
`pdserve serve` is started on the head with `ray exec`, the prefill pool pinned to the worker node and the decode
pool to the head (the `--resources` of each node's start command), one greedy gRPC request is served across the
nodes, `pdserve serve` is stopped (SIGINT by its pid) and `ray down` runs.

What differs from a real cluster, and why:
- no `file_mounts` and no `setup_commands`: both "nodes" share this machine's filesystem, where the project and
  its `.venv` already are (and a namespace cannot reach a package index);
- no `ray stop` in the start commands, and `ray down` only where `ray` is not on a root login shell's PATH
  (checked over SSH first): `ray stop`, which `ray down` runs on the head, stops every Ray process of the user on
  the machine, whatever its namespace. The Ray processes, which the local provider's `ray down` leaves running
  anyway, are killed with the namespaces (NodePair.close);
- each node its own `--temp-dir` (the two raylets share one /tmp).

The test's sshds read a throw-away key from their own AuthorizedKeysFile (StrictModes off: it lies under /tmp), so
root's ~/.ssh is not touched; `ray up` writes ~/ray_bootstrap_key.pem and ~/ray_bootstrap_config.yaml for the head,
which are restored (or removed) afterwards. Needs root, openssh-server and rsync.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import yaml

from tests.e2e.netns import NodePair
from tests.e2e.ray_nodes import ROOT, VENV_BIN, env_for, run_in, serving_config, start_redis
from tests.model_factory import hf_greedy, random_prompts

pytestmark = pytest.mark.slow

GCS_PORT, SERVE_PORT = 6379, 50051  # NOTE: fixed ports are safe: nothing else listens inside our namespaces
BOOTSTRAP = [pathlib.Path("~/ray_bootstrap_key.pem").expanduser(),
             pathlib.Path("~/ray_bootstrap_config.yaml").expanduser()]
NODES_UP = """
import ray, sys, time
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline and sum(n["Alive"] for n in ray.nodes()) < 2:
    time.sleep(1)
print(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]))
"""


@pytest.fixture
def nodes() -> Iterator[NodePair]:
    if os.geteuid() != 0 or not shutil.which("rsync") or not os.path.exists("/usr/sbin/sshd"):
        pytest.fail("the ray up test needs root, openssh-server and rsync (scripts/setup.sh installs them)")
    saved = {p: p.read_bytes() for p in BOOTSTRAP if p.exists()}
    try:
        with NodePair(tag=f"ru{os.getpid()}", subnet="10.78.0") as pair:
            yield pair
    finally:
        for path in BOOTSTRAP:
            if path in saved:
                path.write_bytes(saved[path])
            else:
                path.unlink(missing_ok=True)


def start_sshds(nodes: NodePair, tmp: pathlib.Path) -> pathlib.Path:
    """An sshd in each namespace on its link address, accepting one new key; returns the private key."""
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pdserve-ray-up-multinode", "-f", str(key)],
                   check=True, capture_output=True, timeout=30)
    auth = tmp / "authorized_keys"
    shutil.copy(key.with_suffix(".pub"), auth)
    auth.chmod(0o600)
    os.makedirs("/run/sshd", exist_ok=True)
    if not list(pathlib.Path("/etc/ssh").glob("ssh_host_*_key")):
        subprocess.run(["ssh-keygen", "-A"], check=True, capture_output=True, timeout=60)
    for node in (nodes.a, nodes.b):
        run_in(nodes, node, "/usr/sbin/sshd", "-o", f"ListenAddress={node.ip}", "-o", f"AuthorizedKeysFile={auth}",
               "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", "PermitRootLogin=prohibit-password",
               "-o", f"PidFile={tmp / f'sshd-{node.name}.pid'}", timeout=30)
    return key


def cluster_yaml(nodes: NodePair, tmp: pathlib.Path, key: pathlib.Path) -> pathlib.Path:
    cfg = yaml.safe_load((ROOT / "deploy/ray/cluster.yaml").read_text())
    a, b = nodes.a, nodes.b
    cfg["cluster_name"] = f"pdserve-mn-{os.getpid()}"
    cfg["provider"].update(head_ip=a.ip, worker_ips=[b.ip])
    cfg.update(min_workers=1, max_workers=1, file_mounts={}, setup_commands=[])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    ray = VENV_BIN / "ray"
    env = f"RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE PYTHONPATH={ROOT}"
    common = "--num-cpus=2 --disable-usage-stats"
    cfg["head_start_ray_commands"] = [
        f"{env} {ray} start --head --node-ip-address={a.ip} --port={GCS_PORT} --resources='{{\"node_a\": 1}}' "
        f"--include-dashboard=false --temp-dir={tmp / 'a'} {common} --autoscaling-config=~/ray_bootstrap_config.yaml"]
    cfg["worker_start_ray_commands"] = [
        f"{env} {ray} start --address=$RAY_HEAD_IP:{GCS_PORT} --node-ip-address={b.ip} "
        f"--resources='{{\"node_b\": 1}}' --temp-dir={tmp / 'b'} {common}"]
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_ray_up_head_and_worker_serve_across_nodes_down(nodes: NodePair, models: dict[str, pathlib.Path]) -> None:
    a, b = nodes.a, nodes.b
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pdru"))
    ray = str(VENV_BIN / "ray")
    cluster = None
    try:
        key = start_sshds(nodes, tmp)
        # `ray down` runs `ray stop` on the head over SSH: it must find no `ray` there (see the docstring).
        probe = subprocess.run(nodes.cmd(a, "ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
                                         "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", f"root@{a.ip}",
                                         "bash --login -c -i 'command -v ray'"),
                               capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert probe.returncode != 0 and not probe.stdout.strip(), \
            f"`ray` is on a root login shell's PATH ({probe.stdout.strip()}): `ray down` would stop every Ray on " \
            "this machine"
        cluster = cluster_yaml(nodes, tmp, key)
        t0 = time.monotonic()
        # NOTE: autoscaler v1: under v2, `ray up`'s default since Ray 2.50, the local provider never started the
        # worker (Ray 2.60: the head alone, no launch attempt in the autoscaler's log for 60 s).
        run_in(nodes, a, ray, "up", "-y", "--no-config-cache", str(cluster), timeout=240,
               env=env_for(RAY_UP_enable_autoscaler_v2="0"))
        alive = run_in(nodes, a, sys.executable, "-c", NODES_UP, f"{a.ip}:{GCS_PORT}", "60", timeout=90)
        assert alive.strip() == str(sorted([a.ip, b.ip])), alive + autoscaler_log(tmp)
        up_s = time.monotonic() - t0

        redis_url = start_redis(nodes, a, tmp)
        config = serving_config(tmp / "serving.yaml", redis_url, f"{a.ip}:{GCS_PORT}", {
            "pools": {"prefill": {"node_resource": "node_b"}, "decode": {"node_resource": "node_a"}},
            "server": {"host": a.ip, "port": SERVE_PORT}})
        log = tmp / "serve.log"
        serve = (f"cd {ROOT} && RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE PYTHONPATH={ROOT} "
                 f"PDSERVE_RUNTIME_DIR={tmp / 'run'} nohup {sys.executable} -m pdserve.cli serve --config {config} "
                 f"--model {models['llama']} > {log} 2>&1 < /dev/null &")
        run_in(nodes, a, ray, "exec", str(cluster), serve, timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "serving on" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.5)
        assert f"pdserve: serving on {a.ip}:{SERVE_PORT}" in log.read_text(), log.read_text()[-3000:]

        # Longer than placement.max_local_prefill_tokens (32): prefilled on the worker node, decoded on the head.
        prompt = random_prompts(1, [70], 512, seed=2100)
        out = run_in(nodes, a, sys.executable, "-m", "tests.e2e.multinode_client", f"{a.ip}:{SERVE_PORT}", redis_url,
                     json.dumps(prompt), "8", timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["outputs"] == [hf_greedy(models["llama"], prompt[0], 8)]
        assert result["routing"][0]["disaggregated"] and result["routing"][0]["transferred_blocks"] > 0, result
        assert {i["role"]: i["node_ip"] for i in result["instances"]} == {"prefill": b.ip, "decode": a.ip}, result

        pid = json.loads((tmp / "run" / "pdserve.json").read_text())["controller_pid"]
        os.kill(pid, signal.SIGINT)  # NOTE: by its pid (the cluster file's): a drain
        assert wait_gone(pid, 60), log.read_text()[-3000:]
        # NOTE: Ray first, as `ray stop` on each node would (the local provider's `ray down` does not): the head's
        # autoscaler would otherwise start the worker again (min_workers) once `ray down` marks it terminated.
        sshds = {int((tmp / f"sshd-{n.name}.pid").read_text()) for n in (a, b)}
        stop_all_but(nodes, sshds)
        down = run_in(nodes, a, ray, "down", "-y", str(cluster), timeout=120,
                      env=env_for(RAY_UP_enable_autoscaler_v2="0"))
        # The local provider's record of the cluster: both nodes torn down.
        state = json.loads(state_file(cluster).read_text())
        assert {ip: s["state"] for ip, s in state.items()} == {a.ip: "terminated", b.ip: "terminated"}, (state, down)
        print(f"ray up of head + worker: {up_s:.0f} s until both nodes were alive")
    finally:
        nodes.close()  # the Ray processes, redis-server, both sshds and any ssh multiplexer left in A
        if cluster is not None:
            name = yaml.safe_load(cluster.read_text())["cluster_name"]
            # the local provider's record, its lock, and `ray up`'s cache of this (resolved) configuration
            caches = [p for p in pathlib.Path("/tmp").glob("ray-config-*") if name in p.read_text(errors="replace")]
            for path in (state_file(cluster), state_file(cluster).with_suffix(".lock"), *caches):
                path.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def autoscaler_log(tmp: pathlib.Path) -> str:
    """The tail of the head's autoscaler logs (where a worker that does not come up says why)."""
    logs = sorted((tmp / "a").glob("session_*/logs/monitor*"))
    return "".join(f"\n--- {f.name}:\n" + f.read_text(errors="replace")[-2500:] for f in logs)


def state_file(cluster: pathlib.Path) -> pathlib.Path:
    """Where Ray's local provider keeps its record of the cluster's nodes."""
    return pathlib.Path(f"/tmp/ray/cluster-{yaml.safe_load(cluster.read_text())['cluster_name']}.state")


def stop_all_but(nodes: NodePair, keep: set[int], grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, to every process in the namespaces but `keep` (by pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = {p for n in (nodes.a, nodes.b) for p in nodes.pids(n)} - keep
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if all(wait_gone(pid, grace_s) for pid in pids):
            return


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
