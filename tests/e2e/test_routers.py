"""Router replicas (issue 15) on the real tiny cluster (real Ray, Redis, NIXL, gRPC): `pdserve serve` with
`server.routers: 2` is the controller of two router processes. A router killed with kill -9 costs the streams on
the other router nothing, leaks nothing on the pools (the killed router's streams are aborted there), leaves the
pools untouched, and comes back on its port; `pdserve router` attaches a third router; a client channel over both
routers with round_robin keeps being served when one dies."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc
from pdserve.ready_line import ReadyLine
from tests.e2e.serve_process import ROOT, Server, SlowStreams, serve
from tests.model_factory import make_tiny_model, random_prompts

pytestmark = pytest.mark.slow

A_TOKENS = 8000  # A's streams: left running without their router, they would decode for tens of seconds
ROUTER_LINE = re.compile(r"router (\d+) pid (\d+) port (\d+)")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The tiny llama with a long context. NOTE: the engine decodes at its own pace whatever the client reads
    (decode_worker/stream.py), so a stream the killed router leaves behind must be long in engine time for a
    leak to show: thousands of tokens, tens of seconds on this machine, against the seconds the checks allow."""
    return make_tiny_model(tmp_path_factory.mktemp("long-llama"), "llama", seed=0, max_position_embeddings=8192)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model: pathlib.Path) -> Iterator[Server]:
    # NOTE: the hand-off after the prefill (layer-wise streaming off): this module covers that path end to end
    edits = {"server": {"routers": 2, "max_inflight": 64, "layer_wise_kv": False}, "engine": {"max_model_len": 8192}}
    with serve(tmp_path_factory.mktemp("routers"), model, edits) as srv:
        yield srv


def routers_in_log(server: Server) -> dict[int, list[tuple[int, int]]]:
    """Router index -> every (pid, port) it has run as, in order (the controller logs each start)."""
    seen: dict[int, list[tuple[int, int]]] = {}
    for m in ROUTER_LINE.finditer(server.log.read_text()):
        seen.setdefault(int(m[1]), []).append((int(m[2]), int(m[3])))
    return seen


def wait_restarted(server: Server, index: int, old_pid: int, timeout: float = 60.0) -> tuple[int, int]:
    """(pid, port) of router `index`'s next process once it is serving again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, port = routers_in_log(server)[index][-1]
        if pid != old_pid:
            return pid, port
        time.sleep(0.2)
    raise AssertionError(f"router {index} not restarted within {timeout} s:\n{server.log.read_text()[-3000:]}")


def pools(server: Server) -> dict[str, int]:
    return {i.instance_id: i.pid for i in server.store.live_instances()}


def actor_stats(server: Server) -> dict[str, Any]:
    """Every instance's stats() (bench/actor_stats.py, attached to the cluster through its cluster file)."""
    cluster = json.loads((pathlib.Path(server.env["PDSERVE_RUNTIME_DIR"]) / "pdserve.json").read_text())
    done = subprocess.run([sys.executable, "bench/actor_stats.py", "--address", cluster["ray_address"]],
                          capture_output=True, text=True, env=server.env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def request(tokens: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=tokens), sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def test_a_killed_router_costs_the_other_router_nothing_and_leaks_nothing(server: Server) -> None:
    a, b = server, server.router(1)
    before = pools(server)
    assert len(before) == 2
    (a_pid, a_port), (b_pid, _) = routers_in_log(server)[0][-1], routers_in_log(server)[1][-1]
    assert a.target.endswith(f":{a_port}")
    n = 40
    prompts_b = random_prompts(4, [20, 60, 24, 70], 512, seed=1500)  # local and remote prefills
    prompts_a = random_prompts(3, [18, 40, 28], 512, seed=1501)
    on_b = SlowStreams(b, prompts_b, n, delay_s=0.1)
    on_a = SlowStreams(a, prompts_a, A_TOKENS, delay_s=0.1)
    try:
        on_b.wait_started()
        on_a.wait_started()
        os.kill(a_pid, signal.SIGKILL)
        # (b) a client of A: its call fails, it reconnects to B and is served within 1 s
        with pytest.raises(grpc.RpcError):
            list(a.stub.Generate(request(prompts_a[0][:8], 4), timeout=10))
        t0 = time.monotonic()
        first = next(iter(b.stub.Generate(request(prompts_a[0][:8], 4), timeout=10)))
        reconnect_s = time.monotonic() - t0
        assert first.token_ids and reconnect_s < 1.0, reconnect_s
        on_a.join(30)
        on_b.join(60)
    finally:
        on_a.join(1)
        on_b.join(1)
    assert len(on_a.errors) == 3 and all("UNAVAILABLE" in e for e in on_a.errors), on_a.errors
    # (a) every stream on B completed with every token, equal to the same prompt's greedy run afterwards
    assert not on_b.errors, on_b.errors
    for i, prompt in enumerate(prompts_b):
        final = on_b.finals[i]
        assert final is not None and final.finished and final.usage.completion_tokens == n, final
        assert len(on_b.received[i]) == n
        assert on_b.received[i] == [t for m in b.generate(prompt, max_tokens=n) for t in m.token_ids], f"stream {i}"
    # (d) A's streams did not run on to their 400 tokens holding KV: every instance is idle again
    b.wait_idle(timeout=15)
    # ... because the decode instance aborted them when their router was gone, and counted it
    assert actor_stats(server)["decode-0"]["stream"]["streams_abandoned"] == len(prompts_a)
    # (c) the pools are untouched: the same instance processes, none restarted
    assert pools(server) == before
    log = server.log.read_text()
    assert re.search(rf"WARNING pdserve.controller: router 0 \(pid {a_pid}, port {a_port}\) died \(killed by "
                     r"SIGKILL\)", log), log[-3000:]
    # (e) the controller restarted router A on its port, and it serves
    new_pid, port = wait_restarted(server, 0, a_pid)
    assert port == a_port and new_pid != a_pid
    assert a.generate(prompts_a[0], max_tokens=4)[-1].usage.completion_tokens == 4
    assert routers_in_log(server)[1][-1][0] == b_pid  # B was never restarted
    b.channel.close()


def read_ready_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The process's first stdout line, or "" if it has none within `timeout`."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else ""


def test_pdserve_router_attaches_one_more_router(server: Server, model: pathlib.Path) -> None:
    assert server.config is not None
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "router", "--config", str(server.config),
                             "--model", str(model)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server.env, cwd=ROOT)
    try:
        line = read_ready_line(proc, 60)
        if not line.startswith("pdserve: serving on "):
            proc.kill()
            raise AssertionError(f"no ready line (exit {proc.wait(10)}): {proc.stderr.read()[-3000:]}")
        third = Server(server.proc, ReadyLine.parse(line).targets[0], server.store, server.log)
        assert third.target not in server.targets
        assert third.generate(random_prompts(1, [40], 512, seed=1502)[0], max_tokens=6)[-1].finished
        third.channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_pdserve_router_without_a_cluster_is_one_line_and_exit_2(server: Server, tmp_path: pathlib.Path,
                                                                model: pathlib.Path) -> None:
    assert server.config is not None
    env = {**server.env, "PDSERVE_RUNTIME_DIR": str(tmp_path / "empty")}
    done = subprocess.run([sys.executable, "-m", "pdserve.cli", "router", "--config", str(server.config),
                           "--model", str(model)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("pdserve router: no running cluster") and done.stderr.count("\n") == 1, \
        done.stderr


def test_a_round_robin_channel_over_both_routers_survives_one(server: Server) -> None:
    addresses = ",".join(server.targets)
    channel = grpc.insecure_channel(f"ipv4:{addresses}", options=[("grpc.lb_policy_name", "round_robin")])
    stub = pb_grpc.PDServeStub(channel)
    prompts = random_prompts(20, [16] * 20, 512, seed=1503)
    try:
        for p in prompts[:4]:
            assert list(stub.Generate(request(p, 3), timeout=30))[-1].finished
        b_pid = routers_in_log(server)[1][-1][0]
        os.kill(b_pid, signal.SIGKILL)
        time.sleep(0.2)  # NOTE: a call already sent on B when it died fails: a client retries those
        served = [list(stub.Generate(request(p, 3), timeout=30))[-1].finished for p in prompts[4:]]
        assert all(served)
        wait_restarted(server, 1, b_pid)
    finally:
        channel.close()


def test_sigterm_drains_every_router_then_stops_the_cluster(server: Server) -> None:
    """Last in this module: it stops the cluster (the fixture's teardown then checks exit 0 and one stdout line)."""
    n = 30
    a, b = server, server.router(1)
    prompts = random_prompts(4, [20, 60, 24, 70], 512, seed=1504)
    streams = [SlowStreams(a, prompts[:2], n, delay_s=0.1), SlowStreams(b, prompts[2:], n, delay_s=0.1)]
    try:
        for s in streams:
            s.wait_started()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the controller forwards SIGTERM to both routers: admission closes on each
        for r in (a, b):
            with pytest.raises(grpc.RpcError) as refused:
                r.generate(prompts[0], max_tokens=2, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for s in streams:
            s.join(60)
    finally:
        for s in streams:
            s.join(1)
    for s in streams:
        assert not s.errors, s.errors
        assert all(f is not None and f.usage.completion_tokens == n for f in s.finals)
        assert [len(r) for r in s.received] == [n] * len(s.prompts)
    assert server.proc.wait(60) == 0
    b.channel.close()
