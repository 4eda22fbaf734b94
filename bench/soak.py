"""Soak under faults: `pdserve serve` (2 prefill + 2 decode instances of the small dummy-weights model on CPU, its
own private redis-server) takes N greedy requests at concurrency C while faults are injected at random times:
kill -9 of a decode or a prefill instance, SIGSTOP of a prefill instance for a few seconds, kill -9 of the
private redis-server. Afterwards it checks that no request was lost, that every stream's tokens equal an
undisturbed run of the same prompt (no token repeated or missing), and that no KV block is left in use.

    .venv/bin/python bench/soak.py --requests 5000 --concurrency 64 --json soak.json

Exits 1 if any check fails. Figures and the command: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.v1 import pdserve_pb2 as pb  # noqa: E402
from api.v1 import pdserve_pb2_grpc as pb_grpc  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from metastore import MetadataStore  # noqa: E402
from pdserve.dummy_model import write_dummy_model  # noqa: E402
from pdserve.ready_line import ReadyLine  # noqa: E402


def private_redis(serve_pid: int) -> tuple[str, int]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.search(r"127\.0\.0\.1:(\d+) .*\"redis-server\",pid=(\d+)", line)
        if m and int(Path(f"/proc/{m.group(2)}/stat").read_text().rsplit(")", 1)[1].split()[1]) == serve_pid:
            return f"redis://127.0.0.1:{m.group(1)}/0", int(m.group(2))
    raise RuntimeError("no private redis-server found")


class Soak:
    def __init__(self, args: argparse.Namespace, target: str, serve_pid: int, prompts: list[list[int]],
                 reference: list[list[int]]) -> None:
        self.args, self.serve_pid, self.prompts, self.reference = args, serve_pid, prompts, reference
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PDServeStub(self.channel)
        self.statuses: Counter[str] = Counter()
        self.wrong: list[int] = []
        self.errors: list[str] = []  # the first few failures' details
        self.migrations = 0
        self.faults: list[tuple[float, str]] = []
        self.done = 0
        self.lock = threading.Lock()
        self.finished = threading.Event()

    def request(self, i: int) -> None:
        k = i % len(self.prompts)
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=self.prompts[k]), sampling=pb.SamplingParams(
            max_tokens=self.args.max_tokens, temperature=0.0, ignore_eos=True))
        tokens: list[int] = []
        final = None
        try:
            for msg in self.stub.Generate(req, timeout=120):
                tokens += msg.token_ids
                final = msg if msg.finished else final
            status = "OK" if final is not None else "NO_FINAL_MESSAGE"
        except grpc.RpcError as e:
            status = e.code().name
            with self.lock:
                if len(self.errors) < 20:
                    self.errors.append(f"{status}: {e.details()}")
        with self.lock:
            self.statuses[status] += 1
            self.done += 1
            if status == "OK":
                self.migrations += final.routing.migrations  # type: ignore[union-attr]
                if tokens != self.reference[k]:
                    self.wrong.append(i)

    def store(self) -> MetadataStore:
        return MetadataStore(private_redis(self.serve_pid)[0], "pdserve", registry_lease_s=2)

    def whole(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if len(self.store().live_instances()) == 4:
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError("the pools did not come back to 2 + 2 within 60 s")

    def inject(self) -> None:
        rng = random.Random(self.args.seed)
        start = time.monotonic()
        while not self.finished.wait(rng.uniform(*self.args.fault_every_s)):
            kind = rng.choice(["kill_decode", "kill_prefill", "stop_prefill", "kill_redis"])
            try:
                self.whole()
                if kind == "kill_redis":
                    os.kill(private_redis(self.serve_pid)[1], signal.SIGKILL)
                else:
                    role = "decode" if kind == "kill_decode" else "prefill"
                    victim = rng.choice([i for i in self.store().live_instances() if i.role == role])
                    if kind == "stop_prefill":
                        os.kill(victim.pid, signal.SIGSTOP)
                        time.sleep(self.args.stop_s)
                        os.kill(victim.pid, signal.SIGCONT)
                    else:
                        os.kill(victim.pid, signal.SIGKILL)
                self.faults.append((round(time.monotonic() - start, 1), kind))
                print(f"soak: t={time.monotonic() - start:.0f}s {kind} ({self.done} done)", flush=True)
            except Exception as e:
                print(f"soak: fault {kind} not injected: {e!r}", flush=True)

    def run(self) -> dict[str, object]:
        injector = threading.Thread(target=self.inject, daemon=True)
        t0 = time.monotonic()
        injector.start()
        with ThreadPoolExecutor(self.args.concurrency) as pool:
            list(pool.map(self.request, range(self.args.requests)))
        self.finished.set()
        injector.join(60)
        seconds = time.monotonic() - t0
        self.whole()
        leaked = self.leaked_blocks()
        return {"requests": self.args.requests, "concurrency": self.args.concurrency, "seconds": round(seconds, 1),
                "statuses": dict(self.statuses), "lost": self.args.requests - self.statuses["OK"],
                "wrong_tokens": len(self.wrong), "migrations": self.migrations, "faults": self.faults,
                "instances_with_blocks_in_use": leaked,
                "first_errors": self.errors}

    def leaked_blocks(self, timeout: float = 30.0) -> list[str]:
        """Instances whose heartbeat still reports KV in use once all is idle (prefix-cached blocks are free)."""
        deadline = time.monotonic() + timeout
        busy: list[str] = []
        while time.monotonic() < deadline:
            loads = self.stub.GetLoads(pb.GetLoadsRequest()).instances
            busy = [i.instance_id for i in loads if i.kv_usage > 0 or i.running or i.waiting]
            if len(loads) == 4 and not busy:
                return []
            time.sleep(0.5)
        return busy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=64, help="distinct prompts (each checked against a reference)")
    ap.add_argument("--fault-every-s", type=float, nargs=2, default=(4.0, 10.0))
    ap.add_argument("--stop-s", type=float, default=5.0, help="how long a SIGSTOPped prefill instance stays stopped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the summary here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_dummy_model(tmp, "small")
        prompts = [[rng.randrange(3, 4096) for _ in range(rng.choice([12, 24, 48, 96]))] for _ in range(args.prompts)]
        with LLM(str(model), load_format="dummy", dtype="float32", max_model_len=1024) as llm:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
            reference = [o.token_ids for o in llm.generate(prompts, params)]
        cfg = yaml.safe_load((ROOT / "deploy/ray/serving-tiny-cpu.yaml").read_text())
        cfg["engine"].update(model=str(model), load_format="dummy")
        cfg["pools"] = {"prefill": {"replicas": 2}, "decode": {"replicas": 2}}
        cfg["metastore"].update(redis_url=None, registry_lease_s=2)
        cfg["server"].update(max_inflight=256, prefill_timeout_s=3.0, breaker_cooldown_s=2.0)
        (Path(tmp) / "serving.yaml").write_text(yaml.safe_dump(cfg))
        log = open(Path(tmp) / "serve.log", "w")
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "disabled"}
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--config", str(Path(tmp) /
                                 "serving.yaml"), "--port", "0"], stdout=subprocess.PIPE, stderr=log, text=True,
                                env=env, cwd=ROOT)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.startswith("pdserve: serving on "):
                raise RuntimeError("pdserve serve did not start: " + (Path(tmp) / "serve.log").read_text()[-3000:])
            summary = Soak(args, ReadyLine.parse(line).targets[0], proc.pid, prompts, reference).run()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    summary["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    ok = summary["lost"] == 0 and summary["wrong_tokens"] == 0 and not summary["instances_with_blocks_in_use"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
