"""`ray up` for real: deploy/ray/cluster.yaml brought up on this machine through Ray's local provider over SSH
to 127.0.0.1, `pdserve serve` run on it with `ray exec`, one gRPC request, then `ray stop` and `ray down`.

Needs openssh-server and rsync (scripts/setup.sh installs them as root). The test starts sshd if none runs,
adds a throw-away key to root's authorized_keys and removes it afterwards, and leaves no process behind.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
import yaml

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc
from tests.model_factory import hf_greedy, random_prompts

ROOT = pathlib.Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv" / "bin"
pytestmark = pytest.mark.slow


def run(*cmd: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    if os.geteuid() != 0 or not shutil.which("rsync") or not os.path.exists("/usr/sbin/sshd"):
        pytest.fail("the ray up test needs root, openssh-server and rsync (scripts/setup.sh installs them)")
    pidfile = tmp_path_factory.mktemp("sshd") / "sshd.pid"
    if subprocess.run(["pgrep", "-x", "sshd"], capture_output=True).returncode != 0:
        os.makedirs("/run/sshd", exist_ok=True)
        run("ssh-keygen", "-A")
        run("/usr/sbin/sshd", "-o", f"PidFile={pidfile}")  # ours: stopped after the test
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pdserve-ray-up-test", "-f", str(key))
    auth = pathlib.Path("/root/.ssh/authorized_keys")
    auth.parent.mkdir(mode=0o700, exist_ok=True)
    before = auth.read_text() if auth.exists() else None
    line = key.with_suffix(".pub").read_text()
    with open(auth, "a") as f:
        f.write(line)
    auth.chmod(0o600)
    try:
        yield key
    finally:
        if before is None:
            auth.unlink(missing_ok=True)
        else:
            auth.write_text(before)
        if pidfile.exists():  # NOTE: an sshd this test started; one that ran before it is left alone
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)


def test_ray_up_serve_request_down(ssh_key: pathlib.Path, tmp_path: pathlib.Path,
                                   models: dict[str, pathlib.Path]) -> None:
    name = f"pdserve-test-{os.getpid()}"
    cfg = yaml.safe_load((ROOT / "deploy/ray/cluster.yaml").read_text())
    cfg["cluster_name"] = name
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["max_workers"] = 0
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(ssh_key)}
    # The project is already here: install it in place (the same setup script) instead of syncing a copy.
    cfg["file_mounts"] = {}
    cfg["setup_commands"] = [f"bash {ROOT}/scripts/setup.sh"]
    ray_bin = VENV / "ray"
    cfg["head_start_ray_commands"] = [
        f"{ray_bin} stop",
        f"RAY_AUTH_MODE=disabled {ray_bin} start --head --port=0 --disable-usage-stats --num-cpus=2 "
        "--include-dashboard=false --autoscaling-config=~/ray_bootstrap_config.yaml",
    ]
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(cfg))
    patterns = ("raylet", "gcs_server", "pdserve serve", "redis-server 127.0.0.1")
    before = {p: _pids(p) for p in patterns}  # only what this test starts must be gone at the end
    log = tmp_path / "serve.log"
    port = _free_port()
    try:
        run(str(ray_bin), "up", "-y", "--no-config-cache", str(cluster), timeout=600)
        serve = (f"cd {ROOT} && RAY_AUTH_MODE=disabled RAY_ADDRESS=auto OMP_WAIT_POLICY=PASSIVE nohup "
                 f"{VENV}/pdserve serve --config deploy/ray/serving-tiny-cpu.yaml --model {models['llama']} "
                 f"--port {port} > {log} 2>&1 < /dev/null &")
        run(str(ray_bin), "exec", str(cluster), serve, timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "serving on" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.5)
        assert f"pdserve: serving on 127.0.0.1:{port}" in log.read_text(), log.read_text()[-3000:]
        prompt = random_prompts(1, [70], 512, seed=800)[0]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                     sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
            out = list(pb_grpc.PDServeStub(channel).Generate(req, timeout=60))
        assert out[-1].routing.disaggregated and out[-1].routing.transferred_blocks == 5
        assert [t for r in out for t in r.token_ids] == hf_greedy(models["llama"], prompt, 8)
    finally:
        run(str(ray_bin), "exec", str(cluster), "pkill -INT -f 'pdserve serve' || true", timeout=120, check=False)
        _wait_gone("pdserve serve", 60, before["pdserve serve"])
        # NOTE: with the local provider, `ray down` leaves the head's Ray processes running: stop them first.
        run(str(ray_bin), "exec", str(cluster), f"{ray_bin} stop", timeout=120, check=False)
        run(str(ray_bin), "down", "-y", str(cluster), timeout=300, check=False)
    for pattern in patterns:
        assert _wait_gone(pattern, 30, before[pattern]), f"left running: {pattern}"


def _free_port() -> int:
    from engine.parallel import free_port

    return free_port()


def _pids(pattern: str) -> set[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return {int(p) for p in found} - {os.getpid()}


def _wait_gone(pattern: str, timeout: float, ignore: frozenset[int] | set[int] = frozenset()) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pids(pattern) - ignore:
            return True
        time.sleep(0.5)
    return False


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
