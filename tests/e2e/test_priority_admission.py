"""Priority classes and SLO-aware early rejection on the real tiny CPU cluster (real Ray, Redis, NIXL, gRPC):
an interactive request sent into a flood of batch requests gets its first token ahead of the batch requests
queued before it; a request whose predicted TTFT is over its class's SLO is refused at once (HTTP 429 through
the openai SDK, gRPC RESOURCE_EXHAUSTED) and counted, and the same request is served with early_reject off;
`pdserve bench --api openai` drives the HTTP front with the bench's workload and report."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Iterator

import grpc
import openai
import pytest

from api.v1 import pdserve_pb2 as pb
from tests.e2e.serve_process import Server, serve
from tests.e2e.test_bench import bench
from tests.e2e.test_metrics import scrape, value
from tests.model_factory import random_prompts

pytestmark = pytest.mark.slow

# NOTE: long prompts and one output token: the prefill instance is the bottleneck (the decode instance only pulls
# KV and emits the first token), so the order of first tokens is the prefill engine's order
FLOOD, PROMPT_LEN = 24, 900


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, models: dict[str, pathlib.Path]) -> Iterator[Server]:
    # NOTE: every long prompt is prefilled on prefill-0, however long its queue (no fallback to the decode
    # instance): the flood's queue is then one engine's, in that engine's order
    edits = {"server": {"http_port": 0}, "placement": {"prefill_queue_threshold": 1000}}
    with serve(tmp_path_factory.mktemp("prio"), models["llama"], edits) as s:
        yield s


def request(tokens: list[int], priority: int, max_tokens: int = 1) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=tokens), priority=priority, sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def test_an_interactive_request_overtakes_a_batch_flood(srv: Server) -> None:
    prompts = random_prompts(FLOOD + 2, [PROMPT_LEN] * (FLOOD + 2), 512, seed=99)  # distinct: no cache hits
    first: dict[str, float] = {}
    errors: list[str] = []
    started = threading.Event()

    def send(name: str, tokens: list[int], priority: int) -> None:
        try:
            for _ in srv.stub.Generate(request(tokens, priority), timeout=180):
                first.setdefault(name, time.monotonic())
                started.set()
        except grpc.RpcError as e:
            errors.append(f"{name}: {e.code().name} {e.details()}")

    threads = [threading.Thread(target=send, args=(f"b{i}", p, pb.PRIORITY_BATCH)) for i, p in
               enumerate(prompts[:FLOOD])]
    for t in threads:
        t.start()
    # the flood is queued once its first request has its first token (they arrived together; most still wait)
    assert started.wait(60), "the batch flood never started"
    # two probes at the same moment, one per class: the batch one queues behind the flood, the interactive one not
    probes = [threading.Thread(target=send, args=("interactive", prompts[FLOOD], pb.PRIORITY_INTERACTIVE)),
              threading.Thread(target=send, args=("batch", prompts[FLOOD + 1], pb.PRIORITY_BATCH))]
    sent = time.monotonic()
    for t in probes:
        t.start()
    for t in threads + probes:
        t.join(200)
    assert not errors and len(first) == FLOOD + 2
    # the order of first tokens among the requests still waiting for theirs when the probes were sent
    queue = sorted((n for n in first if first[n] > sent), key=first.__getitem__)
    assert len(queue) >= 10, queue  # the flood was still there
    assert queue.index("interactive") <= 3, queue  # ahead of the flood queued before it
    assert queue.index("batch") >= len(queue) - 3, queue  # the same prompt in the batch class: behind it
    srv.wait_idle()


def test_bench_drives_the_openai_front(srv: Server, tmp_path: pathlib.Path) -> None:
    common = ["--num-requests", "12", "--rate", "8", "--input-len", "uniform:16:48", "--output-len", "fixed:6",
              "--batch-share", "0.5"]
    http = bench(srv.http_url, tmp_path / "http", "--api", "openai", *common)["runs"][0]
    assert http["summary"]["succeeded"] == 12, http["summary"]
    reqs = http["requests"]
    assert all(r["output_tokens"] == 6 and r["ttft_s"] > 0 and r["decode_instance"] == "decode-0" for r in reqs)
    assert {r["priority"] for r in reqs} == {"interactive", "batch"}
    grpc_run = bench(srv.target, tmp_path / "grpc", *common)["runs"][0]  # the same workload through gRPC
    assert [r["prompt_tokens"] for r in grpc_run["requests"]] == [r["prompt_tokens"] for r in reqs]
    srv.wait_idle()


def rejected(url: str) -> float:
    return value(scrape(url), "pdserve:requests_rejected", "pdserve:requests_rejected_total", reason="slo") or 0


def test_early_rejection_refuses_a_request_over_its_class_slo(srv: Server, tmp_path: pathlib.Path,
                                                              models: dict[str, pathlib.Path]) -> None:
    prompt = random_prompts(1, [400], 512, seed=5)[0]
    edits = {"server": {"http_port": 0},
             "admission": {"early_reject": True, "ttft_slo_ms": {"interactive": 1, "batch": 60000}}}
    with serve(tmp_path, models["llama"], edits) as strict:
        client = openai.OpenAI(base_url=strict.http_url + "/v1", api_key="unused", timeout=60, max_retries=0)
        # 400 prompt tokens cannot be prefilled in 1 ms at any rate this CPU reaches: refused before it runs
        with pytest.raises(openai.RateLimitError, match=r"over the interactive class's budget of 1 ms"):
            client.completions.create(model="llama", prompt=prompt, max_tokens=4)
        with pytest.raises(grpc.RpcError) as e:
            strict.generate(prompt, max_tokens=4)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "admission.ttft_slo_ms" in e.value.details()
        assert rejected(strict.metrics_url) == 2
        # the batch class's SLO is 60 s: the same prompt is served
        c = client.completions.create(model="llama", prompt=prompt, max_tokens=4,
                                      extra_body={"priority": "batch", "ignore_eos": True})
        assert c.usage is not None and c.usage.completion_tokens == 4
        assert rejected(strict.metrics_url) == 2
        strict.wait_idle()
    # early_reject off (the default): the same interactive request is served
    client = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    c = client.completions.create(model="llama", prompt=prompt, max_tokens=4, extra_body={"ignore_eos": True})
    assert c.usage is not None and c.usage.completion_tokens == 4
    assert rejected(srv.metrics_url) == 0


def test_early_rejection_caps_a_wait_in_the_admission_queue_at_the_slo(tmp_path: pathlib.Path,
                                                                        models: dict[str, pathlib.Path]) -> None:
    """One slot (server.max_inflight 1) and a queue: a long request holds the slot; an interactive request
    queued behind it is refused once its wait reaches the class's TTFT SLO (not after admission_timeout_s),
    counted with reason="slo"; a batch request (SLO 60 s) waits and is served."""
    long_prompt, short = random_prompts(2, [64, 16], 512, seed=8)
    edits = {"server": {"max_inflight": 1, "max_queued": 8, "admission_timeout_s": 120},
             "admission": {"early_reject": True, "ttft_slo_ms": {"interactive": 400, "batch": 60000}}}
    with serve(tmp_path, models["llama"], edits) as one:
        holder = one.stub.Generate(request(long_prompt, pb.PRIORITY_BATCH, max_tokens=900), timeout=120)
        got = len(next(holder).token_ids)  # its first token: it holds the one slot until its 900th (seconds)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(one.stub.Generate(request(short, pb.PRIORITY_INTERACTIVE, max_tokens=2), timeout=60))
        waited = time.monotonic() - t0
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "no slot within the interactive class's TTFT budget of 400 ms" in e.value.details()
        assert 0.35 < waited < 10, waited  # the SLO, not admission_timeout_s (120 s)
        assert rejected(one.metrics_url) == 1
        batch = one.stub.Generate(request(short, pb.PRIORITY_BATCH, max_tokens=2), timeout=120)
        assert got + sum(len(o.token_ids) for o in holder) == 900  # the holder finishes...
        assert sum(len(o.token_ids) for o in batch) == 2  # ...and the queued batch request gets the slot
        assert rejected(one.metrics_url) == 1
        one.wait_idle()
