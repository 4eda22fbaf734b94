"""The streaming relay: how many generated tokens one router process passes from decode actors to clients per
CPU-second it spends.

`pdserve serve` (one decode instance of the small dummy-weights model on CPU, no prefill pool) serves `streams`
greedy streams at once; the clients count the tokens they receive, and the router process's CPU time (user +
system, from /proc) over the same interval gives tokens per router CPU-second: the rate one router core could
relay if the decode pool were fast enough to feed it. On this 2-core machine the decode instance, not the
router, limits the absolute rate.

    .venv/bin/python bench/router_overhead.py --relay ...   (or call measure_relay())
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.v1 import pdserve_pb2 as pb  # noqa: E402
from api.v1 import pdserve_pb2_grpc as pb_grpc  # noqa: E402
from pdserve.dummy_model import write_dummy_model  # noqa: E402
from pdserve.ready_line import ReadyLine  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure_relay(streams: int = 32, max_tokens: int = 256) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        model = write_dummy_model(tmp, "small")
        cfg = yaml.safe_load((ROOT / "deploy/ray/serving-tiny-cpu.yaml").read_text())
        cfg["engine"].update(model=str(model), load_format="dummy", max_num_seqs=streams)
        cfg["pools"] = {"prefill": {"replicas": 0}, "decode": {"replicas": 1}}
        cfg["server"].update(max_inflight=streams * 2)
        (Path(tmp) / "serving.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
        with open(Path(tmp) / "serve.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--config",
                                     str(Path(tmp) / "serving.yaml"), "--port", "0"], stdout=subprocess.PIPE,
                                    stderr=log, text=True, env=env, cwd=ROOT)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.startswith("pdserve: serving on "):
                raise RuntimeError(f"pdserve serve did not start: {(Path(tmp) / 'serve.log').read_text()[-2000:]}")
            target = ReadyLine.parse(line).targets[0]
            return _relay(target, proc.pid, streams, max_tokens)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _relay(target: str, router_pid: int, streams: int, max_tokens: int) -> dict[str, float]:
    received = [0] * streams
    messages = [0] * streams
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PDServeStub(channel)

        def one(i: int) -> None:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3 + (i * 7 + t) % 4000 for t in range(32)]),
                                         sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                    ignore_eos=True))
            for msg in stub.Generate(request, timeout=600):
                received[i] += len(msg.token_ids)
                messages[i] += 1

        list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingParams(
            max_tokens=4)), timeout=120))  # warm up
        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        cpu0, t0 = cpu_seconds(router_pid), time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        cpu, wall = cpu_seconds(router_pid) - cpu0, time.monotonic() - t0
    tokens = sum(received)
    return {"streams": streams, "tokens": tokens, "messages": sum(messages), "wall_s": wall,
            "router_cpu_s": cpu, "tokens_per_s": tokens / wall, "tokens_per_router_cpu_s": tokens / max(cpu, 1e-9),
            "router_cpu_share": cpu / wall}


if __name__ == "__main__":
    print(measure_relay())
