"""Graceful drain (issue 14): SIGTERM to `pdserve serve` refuses new requests at once, lets the streams in flight
finish with every token, and the process exits 0 (real Ray, Redis, NIXL, gRPC)."""

from __future__ import annotations

import pathlib
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.serve_process import SlowStreams, serve
from tests.model_factory import hf_greedy, random_prompts

pytestmark = pytest.mark.slow


def test_sigterm_drains_streams_in_flight_and_refuses_new_ones(tmp_path: pathlib.Path,
                                                             models: dict[str, pathlib.Path]) -> None:
    n = 40
    prompts = random_prompts(6, [20, 60, 24, 70, 28, 80], 512, seed=2100)  # local and remote prefills
    with serve(tmp_path, models["llama"], {"server": {"drain_timeout_s": 60}}) as server:
        streams = SlowStreams(server, prompts, n, delay_s=0.1)  # still streaming when SIGTERM comes
        streams.wait_started()
        server.proc.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(server.channel)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:  # the server stopped taking calls: draining too
                break
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as refused:  # admission is closed
            server.generate(prompts[0], max_tokens=2, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        streams.join()
        assert not streams.errors, streams.errors
        for i, prompt in enumerate(prompts):
            assert streams.received[i] == hf_greedy(models["llama"], prompt, n), f"stream {i}"
        assert server.proc.wait(60) == 0
