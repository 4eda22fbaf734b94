"""Prometheus metrics and `pdserve status` against the tiny CPU cluster (real Ray, Redis, NIXL, gRPC): a
`pdserve bench` run of N requests, then a scrape of the router's /metrics parsed with prometheus_client's own
text parser."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.v1 import pdserve_pb2 as pb
from engine.step_trace import FIELDS
from tests.e2e.serve_process import ROOT, serve
from tests.e2e.test_bench import bench

pytestmark = pytest.mark.slow
N = 8


def traced_decode_rows(directory: pathlib.Path) -> int:
    rows = 0
    for f in directory.glob("steps-*.jsonl"):
        for line in f.read_text().split("\n")[1:-1]:  # NOTE: not the last piece: a line being written
            rows += dict(zip(FIELDS, json.loads(line), strict=True))["decode_rows"]
    return rows


def scrape(url: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """family name -> its samples (name, labels, value)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str, **labels: str) -> float | None:
    for name, have, v in families.get(family, []):
        if name == sample and all(have.get(k) == want for k, want in labels.items()):
            return v
    return None


def test_bench_run_shows_in_the_scrape_and_in_status(tmp_path: pathlib.Path, models: dict[str, pathlib.Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_STEP_TRACE", str(tmp_path / "steps"))  # inherited by every instance's actor
    with serve(tmp_path, models["llama"]) as srv:
        assert srv.metrics_url.startswith("http://127.0.0.1:") and srv.metrics_url.endswith("/metrics")
        before = scrape(srv.metrics_url)
        # every prefill/decode pair introduced before the first request (router/introductions.py); NOTE: one
        # registering after the router's first round is met by the next, within a second
        roles = [i.role for i in srv.stub.GetLoads(pb.GetLoadsRequest()).instances]
        pairs = roles.count("prefill") * roles.count("decode")
        deadline = time.monotonic() + 10
        while (value(before, "pdserve:router_events", "pdserve:router_events_total", component="introductions",
                     event="pairs") != pairs and time.monotonic() < deadline):
            time.sleep(0.2)
            before = scrape(srv.metrics_url)
        assert pairs >= 1 and value(before, "pdserve:router_events", "pdserve:router_events_total",
                                    component="introductions", event="pairs") == pairs
        assert value(before, "pdserve:router_events", "pdserve:router_events_total", component="introductions",
                     event="failures") == 0
        for route in ("local_prefill", "remote_prefill"):  # present at 0 before any request
            assert value(before, "pdserve:time_to_first_token_seconds", "pdserve:time_to_first_token_seconds_count",
                         route=route) == 0
        # prompts over placement.max_local_prefill_tokens (32): prefilled on the prefill instance, KV pulled
        run = bench(srv.target, tmp_path / "bench", "--num-requests", str(N), "--rate", "8", "--input-len",
                    "fixed:64", "--output-len", "fixed:8")["runs"][0]
        assert run["summary"]["succeeded"] == N
        disaggregated = sum(r["disaggregated"] for r in run["requests"])
        assert disaggregated >= 1
        instances = {i.instance_id: i.role for i in srv.stub.GetLoads(pb.GetLoadsRequest()).instances}
        assert set(instances.values()) == {"prefill", "decode"}
        deadline = time.monotonic() + 15  # stats records: a heartbeat (0.5 s), then the router's read (1 s)
        while True:
            m = scrape(srv.metrics_url)
            moved = [value(m, "pdserve:kv_transfer_bytes", "pdserve:kv_transfer_bytes_total", instance=i)
                     for i, role in instances.items() if role == "decode"]
            if sum(v or 0 for v in moved) > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sum(v or 0 for v in moved) > 0, m.get("pdserve:kv_transfer_bytes")
        ttft = "pdserve:time_to_first_token_seconds"
        remote = value(m, ttft, f"{ttft}_count", route="remote_prefill")
        assert remote == disaggregated and remote + value(m, ttft, f"{ttft}_count", route="local_prefill") == N
        assert value(m, "pdserve:e2e_request_latency_seconds", "pdserve:e2e_request_latency_seconds_count") == N
        assert value(m, "pdserve:inter_token_latency_seconds", "pdserve:inter_token_latency_seconds_count") > 0
        assert value(m, "pdserve:requests", "pdserve:requests_total", status="OK") == N
        assert value(m, "pdserve:requests_by_route", "pdserve:requests_by_route_total",
                     route="remote_prefill") == disaggregated
        decisions = value(m, "pdserve:placement_decision_seconds", "pdserve:placement_decision_seconds_count")
        assert decisions is not None and decisions >= N
        assert value(m, "pdserve:prompt_tokens", "pdserve:prompt_tokens_total") == 64 * N
        assert value(m, "pdserve:generation_tokens", "pdserve:generation_tokens_total") == 8 * N
        for iid, role in instances.items():  # every instance's KV use, with its role
            usage = value(m, "pdserve:kv_cache_usage_perc", "pdserve:kv_cache_usage_perc", instance=iid, role=role)
            total = value(m, "pdserve:kv_cache_total_blocks", "pdserve:kv_cache_total_blocks", instance=iid)
            assert usage is not None and 0 <= usage <= 1 and total and total > 0
            assert value(m, "pdserve:instance_state", "pdserve:instance_state", instance=iid, state="serving") == 1
            # each met the instances of the other role once, and prepared for all of them
            others = sum(r != role for r in instances.values())
            assert value(m, "pdserve:kv_peers_met", "pdserve:kv_peers_met_total", instance=iid) == others
            assert value(m, "pdserve:kv_meet_failures", "pdserve:kv_meet_failures_total", instance=iid) == 0
        steps = value(m, "pdserve:engine_steps", "pdserve:engine_steps_total", instance="decode-0")
        assert steps and steps > 0
        # the step traces (engine/step_trace.py): one file per instance, written off the step loop within a
        # second; every request's 7 tokens after its first were decode rows, wherever it was prefilled
        deadline = time.monotonic() + 10
        while (rows := traced_decode_rows(tmp_path / "steps")) != 7 * N and time.monotonic() < deadline:
            time.sleep(0.5)
        assert rows == 7 * N
        connectors = sorted(json.loads(f.read_text().splitlines()[0])["connector"]
                            for f in (tmp_path / "steps").glob("steps-*.jsonl"))
        assert connectors == sorted("KVProducer" if r == "prefill" else "KVConsumer" for r in instances.values())

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-m", "pdserve.cli", "status", "--target", srv.target],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith("INSTANCE") and "HIT RATE" in lines[0]
        for iid, role in instances.items():
            row = next(line for line in lines if line.startswith(iid))
            assert role in row and "serving" in row
        policy = next(i for i, line in enumerate(lines) if line.startswith("policy: "))
        assert "max_local_prefill_tokens=32" in lines[policy]
        # then the one Ray node (pdserve serve's node watcher), alive, with every instance on it
        assert len(lines) == policy + 2 and lines[-1].startswith("node ") and ": alive; instances: " in lines[-1]
        assert all(f"{iid} ({role}): serving" in lines[-1] for iid, role in instances.items()), lines[-1]
        srv.wait_idle()
