"""Both roles in one process over real NIXL and a real redis-server: local and disaggregated requests, the
metadata store kept current (registry, loads, prefix-block index)."""

from __future__ import annotations

import pathlib
import queue
import threading
import time
from collections.abc import Iterator

import pytest

from decode_worker.worker import DecodeWorker
from engine import EngineConfig, SamplingParams
from engine.block_hash import hash_blocks
from engine.outputs import RequestOutput
from metastore import MetadataStore, RedisServer
from prefill_worker.worker import PrefillWorker
from tests.model_factory import hf_greedy, random_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture
def cluster(models: dict[str, pathlib.Path]) -> Iterator[tuple[PrefillWorker, DecodeWorker, MetadataStore]]:
    with RedisServer() as redis:
        store = MetadataStore(redis.url, registry_lease_s=2.0)
        cfg = EngineConfig(model=str(models["llama"]), dtype="float32", kv_cache_memory_bytes=32 << 20)
        prefill = PrefillWorker("p0", cfg, store=store)
        decode = DecodeWorker("d0", cfg, store=store)
        yield prefill, decode, store
        prefill.shutdown()
        decode.shutdown()
        assert store.live_instances() == []  # shutdown deregisters
        for engine in (prefill.engine, decode.engine):
            assert engine.kv.stats().num_used == 0


def collect(sinkq: queue.Queue, timeout: float = 30) -> list[int]:
    tokens: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = sinkq.get(timeout=timeout)
        tokens += out.new_token_ids
        if out.finished:
            assert out.token_ids == tokens
            return tokens
    raise AssertionError("no final output")


def test_local_and_disaggregated_requests(cluster, models: dict[str, pathlib.Path]) -> None:
    prefill, decode, store = cluster
    model = models["llama"]
    assert [(i.instance_id, i.role) for i in store.live_instances()] == [("d0", "decode"), ("p0", "prefill")]

    short = random_prompts(1, [9], 512, seed=200)[0]
    q1: queue.Queue = queue.Queue()
    assert decode.generate("s", short, GREEDY, q1.put).result(10) == 0
    assert collect(q1) == hf_greedy(model, short, 12)

    long = random_prompts(1, [150], 512, seed=201)[0]
    results: queue.Queue[RequestOutput] = queue.Queue()
    prefill.prefill("l", long, GREEDY, results.put).result(10)
    res = results.get(timeout=30)
    assert res.kv_handoff is not None and res.token_ids == hf_greedy(model, long, 1)
    q2: queue.Queue = queue.Queue()
    assert decode.generate("l", long, GREEDY, q2.put, kv=res.kv_handoff).result(10) == 10  # ceil(150 / 16)
    assert collect(q2) == hf_greedy(model, long, 12)

    # Heartbeats publish both instances' KV events: the prompt's full blocks are indexed on both.
    hashes = hash_blocks(long, 16, decode.engine.config.hash_salt)
    deadline = time.monotonic() + 5
    while store.prefix_overlap(hashes) != {"p0": 9, "d0": 9} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.prefix_overlap(hashes) == {"p0": 9, "d0": 9}
    assert set(store.loads(["p0", "d0"])) == {"p0", "d0"}


def test_bad_request_is_refused_through_the_future(cluster) -> None:
    _, decode, _ = cluster
    with pytest.raises(ValueError, match="prompt is empty"):
        decode.generate("bad", [], GREEDY, lambda out: None).result(10)
    q: queue.Queue = queue.Queue()
    decode.generate("ok", [5, 6, 7], GREEDY, q.put).result(10)
    assert len(collect(q)) == 12


def test_the_engine_is_warmed_up_on_the_thread_that_steps_it(models: dict[str, pathlib.Path]) -> None:
    """PyTorch keeps cuDNN's attention plans per thread: a warm-up on the constructing thread left the loop thread
    to build them again while serving. The worker builds its engine on its loop thread, and a failure there
    reaches the constructor's caller."""
    cfg = EngineConfig(model=str(models["llama"]), dtype="float32", kv_cache_memory_bytes=32 << 20, warmup=True)
    worker = PrefillWorker("p-warm", cfg)
    try:
        assert worker.engine.warmup is not None and worker.engine.warmup.steps
        assert worker.engine.warmup.thread == worker.loop.thread_name == "prefill-p-warm"
        assert worker.loop.call(lambda: threading.current_thread().name).result(10) == "prefill-p-warm"
    finally:
        worker.shutdown()
    with pytest.raises(ValueError, match="holds 0 blocks"):  # raised by the engine, on the loop thread
        PrefillWorker("p-bad", EngineConfig(model=str(models["llama"]), kv_cache_memory_bytes=1))
    deadline = time.monotonic() + 5  # the loop thread ends right after handing the error over
    while "prefill-p-bad" in {t.name for t in threading.enumerate()}:
        assert time.monotonic() < deadline, "the failed loop thread is still running"
        time.sleep(0.01)
