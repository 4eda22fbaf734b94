"""`pdserve bench` against the tiny CPU cluster (real Ray, Redis, NIXL, gRPC)."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Iterator

import pytest

from pdserve.bench import workload
from pdserve.bench.cli import add_arguments
from pdserve.bench.cli import main as bench_main
from tests.e2e.serve_process import Server, serve

_SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared" / "workloads" / "mooncake_synthetic_trace.jsonl"
# The full sample beside the checkout when present (as in CI), else its first 200 lines kept in tests/data.
TRACE = _SHARED if _SHARED.exists() else pathlib.Path(__file__).resolve().parents[1] / "data" / \
    "mooncake_trace_first200.jsonl"
pytestmark = pytest.mark.slow


def bench(target: str, out: pathlib.Path, *argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--target", target, "--out", str(out), "--no-progress", *argv])
    assert bench_main(args) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models: dict[str, pathlib.Path]) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("bench"), models["llama"]) as srv:
        yield srv


def test_hit_rate_rises_with_shared_prefixes(server: Server, tmp_path: pathlib.Path) -> None:
    common = ["--num-requests", "16", "--rate", "8", "--input-len", "uniform:16:48", "--output-len", "fixed:8"]
    plain = bench(server.target, tmp_path / "plain", *common)["runs"][0]
    shared = bench(server.target, tmp_path / "shared", *common, "--prefix-groups", "2", "--prefix-len", "96",
                   "--seed", "1")["runs"][0]
    assert plain["summary"]["succeeded"] == shared["summary"]["succeeded"] == 16
    assert plain["summary"]["prefix_hit_rate"] < 0.05
    assert shared["summary"]["prefix_hit_rate"] > plain["summary"]["prefix_hit_rate"] + 0.3
    # The summary is built from the server's own routing info: check it request by request.
    reqs = shared["requests"]
    assert shared["summary"]["prefix_hit_rate"] == pytest.approx(
        sum(r["cached_tokens"] for r in reqs) / sum(r["prompt_tokens"] for r in reqs))
    assert shared["summary"]["disaggregated_share"] == pytest.approx(sum(r["disaggregated"] for r in reqs) / 16)
    assert all(r["decode_instance"] == "decode-0" and r["output_tokens"] == 8 for r in reqs)
    assert (tmp_path / "shared" / "cdf.png").stat().st_size > 10_000
    server.wait_idle()


def test_trace_replay_of_200_requests_scaled_down(server: Server, tmp_path: pathlib.Path) -> None:
    data = bench(server.target, tmp_path / "trace", "--trace", str(TRACE), "--num-requests", "200",
                 "--time-scale", "0.2,0.1", "--tokens-per-block", "4", "--output-scale", "0.1", "--max-output", "8")
    slower, run = data["runs"]  # a sweep over time scales: the second run offers the same requests twice as fast
    assert [slower["time_scale"], run["time_scale"]] == [0.2, 0.1]
    assert run["rate"] == pytest.approx(2 * slower["rate"]) and slower["rate"] > 0
    assert slower["summary"]["succeeded"] == 200
    # each run its own tokens: the second does not find the first's prompts cached (before: 94% against 4%)
    assert abs(run["summary"]["prefix_hit_rate"] - slower["summary"]["prefix_hit_rate"]) < 0.2
    assert run["summary"]["requests"] == 200 and run["summary"]["succeeded"] == 200
    # Reused hash ids become equal token blocks, which the decode instance finds in its prefix cache.
    rows = workload.mooncake_trace(TRACE, 200, 512)
    seen: set[int] = set()
    reusing = []
    for row in rows:
        if row.hash_ids and row.hash_ids[0] in seen:
            reusing.append(row.index)
        seen.update(row.hash_ids)
    assert reusing, "the sample's first 200 requests reuse prefixes"
    cached = {r["index"]: r["cached_tokens"] for r in run["requests"]}
    assert sum(cached[i] > 0 for i in reusing) >= len(reusing) // 2
    assert run["summary"]["prefix_hit_rate"] > 0
    server.wait_idle()


def test_sweep_writes_goodput_plot(server: Server, tmp_path: pathlib.Path) -> None:
    data = bench(server.target, tmp_path / "sweep", "--rates", "4,16", "--num-requests", "8",
                 "--input-len", "fixed:20", "--output-len", "fixed:4")
    assert [r["rate"] for r in data["runs"]] == [4.0, 16.0]
    assert (tmp_path / "sweep" / "goodput.png").exists()
    assert all(0 <= r["summary"]["goodput"] <= r["summary"]["request_throughput"] + 1e-9 for r in data["runs"])


def test_every_request_is_accounted_for_with_error_codes(tmp_path: pathlib.Path,
                                                         models: dict[str, pathlib.Path]) -> None:
    with serve(tmp_path, models["llama"], {"server": {"max_inflight": 2}}) as srv:
        data = bench(srv.target, tmp_path / "burst", "--num-requests", "12", "--rate", "0", "--input-len",
                     "fixed:24", "--output-len", "fixed:24")
        s = data["runs"][0]["summary"]
        assert s["succeeded"] + sum(s["errors"].values()) == 12
        assert set(s["errors"]) == {"RESOURCE_EXHAUSTED"} and s["errors"]["RESOURCE_EXHAUSTED"] >= 1
        assert s["succeeded"] >= 2
        reqs = data["runs"][0]["requests"]
        assert all((r["status"] == "OK") == bool(r["decode_instance"]) for r in reqs)
        srv.wait_idle()
