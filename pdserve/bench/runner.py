"""Sends a workload to a router at its arrival times and measures every request: over gRPC (here), or over the
OpenAI-compatible HTTP front (`api="openai"`: pdserve/bench/openai_client.py)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

import grpc

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc
from pdserve import client_channel
from pdserve.bench.workload import BenchRequest


@dataclass
class Result:
    index: int
    prompt_tokens: int
    status: str = "OK"  # "OK" or the gRPC status code name; "NOT_SENT" when the run's time bound came first
    error: str = ""
    sent_s: float = 0.0  # when it was sent, from the start of the run
    ttft_s: float | None = None
    tpot_s: float | None = None  # mean gap between tokens after the first
    e2e_s: float | None = None
    output_tokens: int = 0
    finish_reason: str = ""
    disaggregated: bool = False
    cached_tokens: int = 0
    transferred_blocks: int = 0
    decode_instance: str = ""
    prefill_instance: str = ""
    priority: str = "interactive"
    token_times: list[float] = field(default_factory=list, repr=False)


class Progress:
    """One self-overwriting line on stderr: done/total, errors, elapsed."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done, self.errors = total, enabled, 0, 0
        self.start = time.perf_counter()

    def update(self, result: Result) -> None:
        self.done += 1
        self.errors += result.status != "OK"
        if self.enabled:
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} requests, "
                             f"{self.errors} errors, {time.perf_counter() - self.start:5.1f} s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def _one(stub: pb_grpc.PDServeStub, req: BenchRequest, start: float, timeout: float,
               temperature: float, metadata: tuple[tuple[str, str], ...] | None = None) -> Result:
    res = Result(req.index, len(req.tokens), priority=req.priority)
    grpc_req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=req.tokens), sampling=pb.SamplingParams(
        max_tokens=req.max_tokens, temperature=temperature, ignore_eos=True),
        priority=pb.PRIORITY_BATCH if req.priority == "batch" else pb.PRIORITY_INTERACTIVE)
    t0 = time.perf_counter()
    res.sent_s = t0 - start
    try:
        async for msg in stub.Generate(grpc_req, timeout=timeout, metadata=metadata):
            now = time.perf_counter()
            res.token_times += [now - t0] * len(msg.token_ids)
            res.output_tokens += len(msg.token_ids)
            if msg.finished:
                r = msg.routing
                res.finish_reason, res.disaggregated = msg.finish_reason, r.disaggregated
                res.cached_tokens, res.transferred_blocks = r.cached_tokens, r.transferred_blocks
                res.decode_instance, res.prefill_instance = r.decode_instance, r.prefill_instance
    except grpc.aio.AioRpcError as e:
        res.status, res.error = e.code().name, e.details() or ""
        return res
    res.e2e_s = time.perf_counter() - t0
    if res.token_times:
        res.ttft_s = res.token_times[0]
        if len(res.token_times) > 1:
            res.tpot_s = (res.token_times[-1] - res.token_times[0]) / (len(res.token_times) - 1)
    return res


async def run(target: str, workload: list[BenchRequest], max_duration_s: float, request_timeout_s: float = 120,
              temperature: float = 0.0, progress: bool = True, api: str = "grpc",
              model: str = "", api_key: str | None = None, tls_ca: str | None = None) -> tuple[list[Result], float]:
    """Send every request at its arrival time (requests whose arrival is past `max_duration_s` are NOT_SENT;
    ones still running at the bound are cancelled, CANCELLED). `api`: "grpc" (`target` HOST:PORT) or "openai"
    (`target` http(s)://HOST:PORT, `model` the served model's id); `api_key` and `tls_ca` as in
    pdserve/client_channel.py. Returns results in workload order and the run's wall time."""
    from pdserve.bench import openai_client

    bar = Progress(len(workload), progress)
    async with contextlib.AsyncExitStack() as stack:
        if api == "openai":
            # NOTE: no connection limit: the bench must not queue requests the server should see
            session = await stack.enter_async_context(openai_client.session(api_key, tls_ca, limit=0))

            def send(req: BenchRequest, start: float) -> Awaitable[Result]:
                return openai_client.one(session, target.rstrip("/"), model, req, start, request_timeout_s,
                                         temperature)
        else:
            channel = await stack.enter_async_context(client_channel.aio_channel(target, tls_ca))
            stub = pb_grpc.PDServeStub(channel)
            metadata = client_channel.metadata(api_key)

            def send(req: BenchRequest, start: float) -> Awaitable[Result]:
                return _one(stub, req, start, request_timeout_s, temperature, metadata)
        start = time.perf_counter()

        async def scheduled(req: BenchRequest) -> Result:
            delay = req.arrival_s - (time.perf_counter() - start)
            if req.arrival_s > max_duration_s:
                result = Result(req.index, len(req.tokens), status="NOT_SENT", error="past the run's time bound",
                                priority=req.priority)
            else:
                if delay > 0:
                    await asyncio.sleep(delay)
                result = await send(req, start)
            bar.update(result)
            return result

        tasks = [asyncio.create_task(scheduled(r)) for r in workload]
        done, pending = await asyncio.wait(tasks, timeout=max_duration_s + request_timeout_s)
        for task in pending:
            task.cancel()
        results = []
        for req, task in zip(workload, tasks, strict=True):
            if task in done and not task.cancelled():
                results.append(task.result())
            else:
                results.append(Result(req.index, len(req.tokens), status="CANCELLED", error="run time bound",
                                      priority=req.priority))
        elapsed = time.perf_counter() - start
    bar.close()
    return results, elapsed
