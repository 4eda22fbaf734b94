"""RouterService without Ray or Redis: fake actors speak the typed contract (instance/messages.py), a fake
store answers the cluster view's reads. Checks what reaches the client: tokens, usage, routing (with the placement's
reason), and the status a worker's typed error becomes."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import ray

import api.v1.pdserve_pb2 as pb
from engine.errors import NoKVSpaceError
from engine.model_info import ModelInfo
from engine.sampling_params import SamplingParams
from instance.messages import PrefillDone, StreamDelta
from metastore import InstanceInfo, InstanceStatsRecord, Load, PlacementPolicy
from metastore.nodes import NodeRecord
from metastore.store import IndexSnapshot
from router.cluster_view import ClusterView
from router.placement import Placement
from router.service import RouterService
from router.slo_tally import SloCounts, SloTally
from router.wire import generate_input, to_response

INFO = ModelInfo(model="/m", vocab_size=512, max_model_len=256, block_size=16, hash_salt="s",
                 eos_token_ids=(2,), dtype="float32")
POLICY = PlacementPolicy(max_local_prefill_tokens=64, prefill_queue_threshold=4)
HANDLE = object()  # stands for a KVHandle: the router passes it on untouched


def inst(i: str, role: str) -> InstanceInfo:
    return InstanceInfo(instance_id=i, role=role, address=i, tp_size=1, block_size=16, num_blocks=100,
                        max_num_seqs=8)


class FakeStore:
    def __init__(self) -> None:
        self.instances = [inst("d0", "decode"), inst("p0", "prefill")]
        self.busy: dict[str, Load] = {}
        self.stats: dict[str, InstanceStatsRecord] = {}

    def live_instances(self, role: str | None = None) -> list[InstanceInfo]:
        return [i for i in self.instances if role in (None, i.role)]

    def index_snapshot(self, instance_id: str) -> IndexSnapshot:
        return IndexSnapshot("0-0", 0, [])

    def loads(self, instance_ids: list[str]) -> dict[str, Load]:
        return {i: self.busy.get(i, Load()) for i in instance_ids}

    def instance_stats(self, instance_ids: list[str]) -> dict[str, InstanceStatsRecord]:
        return {i: self.stats[i] for i in instance_ids if i in self.stats}

    def policy(self, base: PlacementPolicy | None = None) -> PlacementPolicy:
        assert base is not None
        return base

    def nodes(self) -> tuple[NodeRecord, ...]:
        return ()


class Method:
    """An actor method: .remote(...) returns an awaitable (here a coroutine, in Ray an ObjectRef)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls: list[tuple[Any, ...]] = []

    def options(self, **kwargs: Any) -> Method:
        return self

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.fn(*args)


async def ready(value: Any) -> Any:
    if isinstance(value, BaseException):
        raise value
    return value


async def stream(items: list[Any]) -> AsyncIterator[Awaitable[Any]]:
    for item in items:
        yield ready(item)


class FakeActor:
    def __init__(self, done: PrefillDone | None = None, deltas: list[Any] | None = None) -> None:
        self.prefill = Method(lambda rid, prompt, params: ready(done))
        self.generate = Method(lambda rid, prompt, params, kv_handle, resumed, text_offset: stream(deltas or []))
        self.abort = Method(lambda rid: ready(None))


class Aborted(Exception):
    pass


class FakeContext:
    status: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted

    def code(self) -> grpc.StatusCode | None:
        return self.status[0] if self.status else None


def service(actors: dict[str, FakeActor]) -> RouterService:
    view = ClusterView(FakeStore(), POLICY)  # type: ignore[arg-type]
    view.refresh()  # NOTE: by hand, without its thread
    svc = RouterService(INFO, None, view, "ns")
    svc._actors.update(actors)
    return svc


def generate(svc: RouterService, prompt: list[int], ctx: FakeContext | None = None,
             **sampling: Any) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(request_id="r1", token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(**sampling))

    async def collect() -> list[pb.GenerateResponse]:
        return [r async for r in svc.Generate(request, ctx or FakeContext())]  # type: ignore[arg-type]

    return asyncio.run(collect())


def test_final_message_carries_the_placement_reason() -> None:
    placement = Placement("d0", "p0", cached_tokens=16, effective_prefill_tokens=84, reason="remote: because")
    last = StreamDelta(token_ids=[7], text="x", finished=True, finish_reason="length", cached_tokens=32,
                       transferred_blocks=5)
    msg = to_response(RouterService._final("r1", last, prompt_tokens=100, completion=3, placement=placement))
    assert msg.finished and msg.finish_reason == "length" and list(msg.token_ids) == [7]
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens) == (100, 3)
    r = msg.routing
    assert (r.prefill_instance, r.decode_instance, r.disaggregated) == ("p0", "d0", True)
    assert (r.cached_tokens, r.transferred_blocks, r.reason) == (32, 5, "remote: because")


def test_remote_prefill_passes_typed_values_and_reports_why(caplog: pytest.LogCaptureFixture) -> None:
    prefill = FakeActor(done=PrefillDone(kv_handle=HANDLE))  # type: ignore[arg-type]
    decode = FakeActor(deltas=[StreamDelta([9, 10], "ab", finished=False),
                               StreamDelta([11], "c", finished=True, finish_reason="length",
                                           transferred_blocks=6)])
    svc = service({"p0": prefill, "d0": decode})
    with caplog.at_level(logging.DEBUG, logger="router.service"):
        out = generate(svc, list(range(3, 103)), max_tokens=3, temperature=0.0)
    assert [list(m.token_ids) for m in out] == [[9, 10], [11]] and out[-1].usage.completion_tokens == 3
    assert out[-1].routing.disaggregated and out[-1].routing.transferred_blocks == 6
    assert out[-1].routing.reason.startswith("remote: 100 uncached tokens")
    assert any("remote: 100 uncached tokens" in r.getMessage() for r in caplog.records)
    assert [m.request_id for m in out] == ["r1", "r1"]  # the client's id; the instances know it by one of its own
    (rid, prompt, params), = prefill.prefill.calls
    assert re.fullmatch(r"r1@[0-9a-f]{12}", rid) and prompt == list(range(3, 103))
    assert isinstance(params, SamplingParams) and (params.max_tokens, params.temperature) == (3, 0.0)
    assert params.top_p == 1.0  # unset on the wire: SamplingParams' default
    (decode_rid, _, decode_params, kv_handle, resumed, text_offset), = decode.generate.calls
    assert decode_rid == rid and decode_params is params and kv_handle is HANDLE and (resumed, text_offset) == ([], 0)
    assert not svc.inflight and not svc.load.prefill_pending and not svc.load.requests_on and not decode.abort.calls
    assert not svc.by_client_id and not svc.client_id_of
    # the client reuses its id: the instances see a new one, so nothing still under way for the first (a late
    # abort, a late stream message) can reach the second
    assert [m.request_id for m in generate(svc, list(range(3, 103)), max_tokens=3)] == ["r1", "r1"]
    (second, *_), = prefill.prefill.calls[1:]
    assert re.fullmatch(r"r1@[0-9a-f]{12}", second) and second != rid


def sample(svc: RouterService, name: str, **labels: str) -> float | None:
    return svc.metrics.registry.get_sample_value(name, labels)


def test_metrics_record_status_route_latencies_tokens_and_instances() -> None:
    prefill = FakeActor(done=PrefillDone(kv_handle=HANDLE))  # type: ignore[arg-type]
    decode = FakeActor(deltas=[StreamDelta([9, 10], "", finished=False),
                               StreamDelta([11], "", finished=True, finish_reason="length", cached_tokens=32)])
    svc = service({"p0": prefill, "d0": decode})
    svc.view.store.stats["d0"] = InstanceStatsRecord(heartbeat_seq=1, kv_blocks_used=3, kv_blocks_total=12,
                                                     prefix_cache_queries=100, prefix_cache_hits=25,
                                                     kv_transfer_bytes=4096)
    svc.view._next_stats = 0.0
    svc.view.refresh()
    svc.slo_tally = SloTally(slo_ttft_s=1e-9, slo_tpot_s=60.0)  # as pdserve serve attaches the adaptive split's
    generate(svc, list(range(3, 103)), max_tokens=3)
    ctx = FakeContext()
    with pytest.raises(Aborted):
        generate(svc, [], ctx)
    assert sample(svc, "pdserve:requests_total", status="OK") == 1
    assert sample(svc, "pdserve:requests_total", status="INVALID_ARGUMENT") == 1
    assert sample(svc, "pdserve:requests_by_route_total", route="remote_prefill") == 1
    assert sample(svc, "pdserve:requests_by_route_total", route="local_prefill") == 0
    assert sample(svc, "pdserve:time_to_first_token_seconds_count", route="remote_prefill") == 1
    assert sample(svc, "pdserve:time_to_first_token_seconds_count", route="local_prefill") == 0
    # the finished request against the tally's SLOs (no TTFT meets 1 ns); the refused one is not counted
    assert svc.slo_tally.totals() == SloCounts(finished=1, ttft_met=0, tpot_met=1, both_met=0)
    assert sample(svc, "pdserve:inter_token_latency_seconds_count") == 1
    assert sample(svc, "pdserve:e2e_request_latency_seconds_count") == 1
    assert sample(svc, "pdserve:placement_decision_seconds_count") == 1
    assert (sample(svc, "pdserve:prompt_tokens_total"), sample(svc, "pdserve:generation_tokens_total"),
            sample(svc, "pdserve:cached_prompt_tokens_total")) == (100, 3, 32)
    assert sample(svc, "pdserve:requests_in_flight") == 0 and sample(svc, "pdserve:requests_queued") == 0
    d0 = {"instance": "d0", "role": "decode"}
    assert sample(svc, "pdserve:kv_cache_usage_perc", **d0) == 0.25
    assert sample(svc, "pdserve:prefix_cache_hit_rate", **d0) == 0.25
    assert sample(svc, "pdserve:kv_transfer_bytes_total", **d0) == 4096
    assert sample(svc, "pdserve:instance_state", **d0, state="serving") == 1
    # p0 published no stats record: present, at zero, with its heartbeats missing
    p0 = {"instance": "p0", "role": "prefill"}
    assert sample(svc, "pdserve:kv_cache_used_blocks", **p0) == 0
    assert sample(svc, "pdserve:instance_state", **p0, state="missing heartbeats") == 1
    svc.view.store.instances = svc.view.store.instances[:1]  # p0 left: gone from the next scrape
    svc.view.refresh()
    assert sample(svc, "pdserve:kv_cache_used_blocks", **p0) is None


def test_aborted_prefill_ends_the_request_with_reason() -> None:
    prefill = FakeActor(done=PrefillDone(kv_handle=None))
    decode = FakeActor()
    out = generate(service({"p0": prefill, "d0": decode}), list(range(3, 103)))
    assert len(out) == 1 and out[0].finish_reason == "abort" and out[0].routing.reason.startswith("remote")
    assert not decode.generate.calls


def test_short_prompt_runs_locally() -> None:
    decode = FakeActor(deltas=[StreamDelta([5], "", finished=True, finish_reason="stop", cached_tokens=16)])
    svc = service({"d0": decode})
    out = generate(svc, list(range(3, 23)))
    assert not out[-1].routing.disaggregated and out[-1].routing.cached_tokens == 16
    assert out[-1].routing.reason.startswith("local: 20 uncached tokens")
    (_, _, _, kv_handle, _, _), = decode.generate.calls
    assert kv_handle is None
    # its one message was its first token: a local prefill's TTFT
    assert sample(svc, "pdserve:time_to_first_token_seconds_count", route="local_prefill") == 1
    assert sample(svc, "pdserve:time_to_first_token_seconds_count", route="remote_prefill") == 0


@pytest.mark.parametrize(("cause", "code"), [
    (NoKVSpaceError("no KV blocks for 100 tokens"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError("stop strings need a tokenizer.json"), grpc.StatusCode.INVALID_ARGUMENT),
    (RuntimeError("no KV blocks, but not the typed error"), grpc.StatusCode.INTERNAL),
])
def test_worker_errors_map_by_type(cause: Exception, code: grpc.StatusCode) -> None:
    decode = FakeActor(deltas=[ray.exceptions.RayTaskError("generate", "traceback", cause)])
    ctx = FakeContext()
    with pytest.raises(Aborted):
        generate(service({"d0": decode}), list(range(3, 23)), ctx)
    assert ctx.status is not None and ctx.status[0] == code and str(cause) in ctx.status[1]
    assert decode.abort.calls == [decode.generate.calls[0][:1]]  # not finished: the worker frees its blocks


@pytest.mark.parametrize(("prompt", "message"), [
    ([], "prompt is empty"),
    ([5, 512], "outside the vocabulary"),
    (list(range(256)), "max_model_len is 256"),
])
def test_bad_prompt_is_refused_before_placement(prompt: list[int], message: str) -> None:
    decode = FakeActor()
    ctx = FakeContext()
    with pytest.raises(Aborted):
        generate(service({"d0": decode}), prompt, ctx)
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert message in ctx.status[1] and not decode.generate.calls


def test_model_info_answers_from_model_info() -> None:
    reply = asyncio.run(service({}).GetModelInfo(pb.GetModelInfoRequest(), None))  # type: ignore[arg-type]
    assert (reply.model, reply.vocab_size, reply.max_model_len, reply.block_size, reply.dtype) == \
        ("/m", 512, 256, 16, "float32")
    assert list(reply.eos_token_ids) == [2]


def two_decodes(view: ClusterView) -> None:
    """d0 and d1, with d1 busier: a request starts on d0."""
    store: FakeStore = view.store  # type: ignore[assignment]
    store.instances = [inst("d0", "decode"), inst("d1", "decode"), inst("p0", "prefill")]
    store.busy = {"d1": Load(running=4)}
    view.refresh()


def test_failed_prefill_is_retried_locally_and_the_instance_is_dropped_at_once() -> None:
    prefill = FakeActor(done=ray.exceptions.ActorDiedError())  # type: ignore[arg-type]
    decode = FakeActor(deltas=[StreamDelta([7, 8], "xy", finished=True, finish_reason="length")])
    svc = service({"p0": prefill, "d0": decode})
    out = generate(svc, list(range(3, 103)), max_tokens=2, temperature=0.0)
    assert [list(m.token_ids) for m in out] == [[7, 8]] and out[-1].finish_reason == "length"
    assert not out[-1].routing.disaggregated and out[-1].routing.prefill_instance == ""
    (_, _, _, kv_handle, _, _), = decode.generate.calls
    assert kv_handle is None  # the decode instance prefilled the prompt itself
    assert svc.counters["prefill_retries"] == 1 and svc.counters["local_prefill_fallbacks"] == 1
    assert not svc.health.usable(inst("p0", "prefill"))  # dead at once: its breaker is open
    assert svc.health.usable(inst("d0", "decode"))


def test_lost_decode_moves_the_stream_with_its_tokens_and_text() -> None:
    lost = FakeActor(deltas=[StreamDelta([9], "a", finished=False), StreamDelta([10], "b", finished=False),
                             ray.exceptions.ActorDiedError()])
    other = FakeActor(deltas=[StreamDelta([11, 12], "cd", finished=True, finish_reason="length")])
    svc = service({"d0": lost, "d1": other})
    two_decodes(svc.view)
    out = generate(svc, list(range(3, 23)), max_tokens=4, temperature=0.0)
    assert [list(m.token_ids) for m in out] == [[9], [10], [11, 12]]
    assert out[-1].usage.completion_tokens == 4 and out[-1].routing.migrations == 1
    assert out[-1].routing.decode_instance == "d1" and "moved from d0" in out[-1].routing.reason
    (_, prompt, _, kv_handle, resumed, text_offset), = other.generate.calls
    assert (prompt, kv_handle, resumed, text_offset) == (list(range(3, 23)), None, [9, 10], 2)
    assert svc.counters["migrations"] == 1 and not svc.health.usable(inst("d0", "decode"))


def test_a_stream_that_keeps_losing_instances_ends_unavailable() -> None:
    died = [StreamDelta([9], "a", finished=False), ray.exceptions.ActorDiedError()]
    svc = service({"d0": FakeActor(deltas=died), "d1": FakeActor(deltas=died)})
    two_decodes(svc.view)
    svc.max_migrations = 1
    ctx = FakeContext()
    with pytest.raises(Aborted):
        generate(svc, list(range(3, 23)), ctx, max_tokens=4, temperature=0.0)
    assert ctx.status is not None and ctx.status[0] == grpc.StatusCode.UNAVAILABLE
    assert "server.max_migrations 1" in ctx.status[1]


def test_a_failure_after_a_move_aborts_the_request_where_it_runs_now() -> None:
    lost = FakeActor(deltas=[StreamDelta([9], "a", finished=False), ray.exceptions.ActorDiedError()])
    other = FakeActor(deltas=[StreamDelta([10], "b", finished=False), RuntimeError("boom")])
    svc = service({"d0": lost, "d1": other})
    two_decodes(svc.view)
    with pytest.raises(RuntimeError, match="boom"):
        generate(svc, list(range(3, 23)), max_tokens=8, temperature=0.0)
    assert other.abort.calls == [other.generate.calls[0][:1]]  # freed where it ran last, not where it left
    assert not lost.abort.calls and re.fullmatch(r"r1@[0-9a-f]{12}", other.abort.calls[0][0])
    assert not svc.inflight


def test_the_request_class_reaches_the_instances_in_its_sampling_params() -> None:
    import dataclasses

    from engine.priority import Priority
    from router.generation import GenerateInput

    def run(inp: GenerateInput) -> SamplingParams:
        decode = FakeActor(deltas=[StreamDelta([9], "a", finished=True, finish_reason="length")])
        svc = service({"d0": decode})

        async def collect() -> None:
            _ = [o async for o in svc.generate(inp)]

        asyncio.run(collect())
        (_, _, params, _, _, _), = decode.generate.calls
        return params

    grpc_inp = generate_input(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), priority=pb.PRIORITY_BATCH,
                                                 sampling=pb.SamplingParams(max_tokens=1)), None)
    assert grpc_inp.priority is Priority.BATCH and run(grpc_inp).priority is Priority.BATCH
    # a key's class (auth) replaces GenerateInput.priority: that is what the engines get
    assert run(dataclasses.replace(grpc_inp, priority=Priority.INTERACTIVE)).priority is Priority.INTERACTIVE
