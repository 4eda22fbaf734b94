"""`pdserve status`'s table (the live cluster: tests/e2e/test_metrics.py) and the ready line's format."""

from __future__ import annotations

import io

import pytest

from api.v1 import pdserve_pb2 as pb
from pdserve.ready_line import ReadyLine
from pdserve.status import main, render


def test_table_has_one_row_per_instance_and_the_policy() -> None:
    loads = pb.GetLoadsResponse(instances=[
        pb.InstanceLoad(instance_id="decode-0", role="decode", tensor_parallel_size=2, host="h1", pid=42,
                        state="serving", waiting=1, running=3, kv_usage=0.25, kv_blocks_used=3, kv_blocks_total=12,
                        prefix_cache_hit_rate=0.5, restarts=1),
        pb.InstanceLoad(instance_id="prefill-0", role="prefill", tensor_parallel_size=1, state="breaker open"),
    ], policy={"kv_weight": "0.5", "overlap_weight": "1.0"})
    out = io.StringIO()
    render(loads, out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["INSTANCE", "ROLE", "TP", "HOST", "PID", "STATE", "WAIT/RUN", "KV", "USE", "HIT",
                                "RATE", "RESTARTS"]
    assert lines[1].split() == ["decode-0", "decode", "2", "h1", "42", "serving", "1/3", "25%", "(3/12)", "50.0%",
                                "1"]
    assert "breaker open" in lines[2] and lines[2].startswith("prefill-0")
    assert lines[3] == "policy: kv_weight=0.5 overlap_weight=1.0"


def test_unreachable_router_exits_1() -> None:
    assert main("127.0.0.1:1", timeout=2.0) == 1


def test_ready_line_round_trips_and_refuses_other_lines() -> None:
    line = "pdserve: serving on 127.0.0.1:5 metrics http://127.0.0.1:6/metrics"
    ready = ReadyLine.parse(line + "\n")
    assert ready == ReadyLine(("127.0.0.1:5",), ("http://127.0.0.1:6/metrics",)) and ready.format() == line
    two = ReadyLine.join([ready, ReadyLine(("127.0.0.1:7",), ("http://127.0.0.1:8/metrics",))])
    assert two.format() == ("pdserve: serving on 127.0.0.1:5,127.0.0.1:7 metrics "
                            "http://127.0.0.1:6/metrics,http://127.0.0.1:8/metrics")
    assert ReadyLine.parse(two.format()) == two
    with pytest.raises(ValueError):
        ReadyLine.parse("pdserve: serving on 127.0.0.1:5")


def test_ready_line_carries_the_http_urls_after_the_metrics_urls() -> None:
    line = "pdserve: serving on 127.0.0.1:5 metrics http://127.0.0.1:6/metrics http http://127.0.0.1:9"
    ready = ReadyLine.parse(line)
    assert ready.http_urls == ("http://127.0.0.1:9",) and ready.metrics_urls == ("http://127.0.0.1:6/metrics",)
    assert ready.format() == line
    two = ReadyLine.join([ready, ReadyLine(("h:7",), ("http://h:8/metrics",), ("http://h:10",))])
    assert two.format().endswith(" http http://127.0.0.1:9,http://h:10") and ReadyLine.parse(two.format()) == two
    with pytest.raises(ValueError):  # one HTTP URL per router, or none
        ReadyLine(("a:1", "b:2"), ("m1", "m2"), ("http://a:3",))


def test_nodes_follow_the_policy_one_line_each() -> None:
    loads = pb.GetLoadsResponse(policy={"kv_weight": "0.5"}, nodes=[
        pb.NodeStatus(node_id="aa", node_ip="10.0.0.1", state="alive",
                      instances=[pb.NodeInstance(instance_id="decode-0", role="decode", state="serving")]),
        pb.NodeStatus(node_id="bb", node_ip="10.0.0.2", state="lost", lost_at=0.5, instances=[
            pb.NodeInstance(instance_id="prefill-0", role="prefill",
                            state="restart pending: no alive node offers resource node_b")]),
        pb.NodeStatus(node_id="cc", node_ip="10.0.0.3", state="alive")])
    out = io.StringIO()
    render(loads, out)
    assert out.getvalue().splitlines()[3:] == [  # after the header, "(no instance registered)", the policy
        "node 10.0.0.1 (aa): alive; instances: decode-0 (decode): serving",
        "node 10.0.0.2 (bb): lost at 1970-01-01 00:00:00 UTC; instances: prefill-0 (prefill): restart pending: no "
        "alive node offers resource node_b",
        "node 10.0.0.3 (cc): alive; instances: none"]
