"""A role switch in one process over real NIXL and a real redis-server: the worker drains, swaps its KV connector
and registers under the new role, keeping its engine, weights and KV cache; it then serves the new role."""

from __future__ import annotations

import pathlib
import queue

import pytest

from engine import EngineConfig, SamplingParams
from engine.outputs import RequestOutput
from kv_transfer import KVConsumer, KVProducer
from metastore import MetadataStore, RedisServer
from pdserve.serving_actor import ServingWorker
from tests.model_factory import hf_greedy, random_prompts

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def run(submit, timeout: float = 60) -> list[RequestOutput]:  # type: ignore[no-untyped-def]
    q: queue.Queue[RequestOutput] = queue.Queue()
    submit(q.put).result(30)
    outs = [q.get(timeout=timeout)]
    while not outs[-1].finished:
        outs.append(q.get(timeout=timeout))
    return outs


def test_switch_keeps_the_engine_and_serves_the_new_role(models: dict[str, pathlib.Path]) -> None:
    with RedisServer() as redis:
        store = MetadataStore(redis.url, registry_lease_s=2.0)
        cfg = EngineConfig(model=str(models["llama"]), dtype="float32", kv_cache_memory_bytes=16 << 20)
        a = ServingWorker("a", cfg, store=store, role="decode")
        b = ServingWorker("b", cfg, store=store, role="decode")
        try:
            engine, runner = a.engine, a.engine.executor.runner
            cache, cache_ptr = runner.kv_cache, runner.kv_cache.tensor.data_ptr()
            assert isinstance(engine.remote.connector, KVConsumer)
            report = a.drain(grace_s=0.2, timeout_s=5)
            assert not report.timed_out and report.waited_s >= 0.2
            assert [i.instance_id for i in store.live_instances()] == ["b"]  # out of the registry while drained
            a.switch_role("prefill")
            a.rejoin()
            assert {i.instance_id: i.role for i in store.live_instances()} == {"a": "prefill", "b": "decode"}
            assert a.engine is engine and a.engine.executor.runner is runner and a.poll_when_idle
            assert runner.kv_cache is cache and cache.tensor.data_ptr() == cache_ptr  # the same KV pool
            assert isinstance(engine.remote.connector, KVProducer)
            # a now prefills for b, which pulls the KV: the output is the reference's
            prompt = random_prompts(1, [40], 512, seed=7)[0]
            first = run(lambda sink: a.prefill("r1", prompt, GREEDY, sink))[-1]
            assert first.kv_handoff is not None
            outs = run(lambda sink: b.generate("r1", prompt, GREEDY, sink, first.kv_handoff))
            assert [t for o in outs for t in o.new_token_ids] == hf_greedy(models["llama"], prompt, 6)
            assert a.wait_idle(10).timed_out is False  # the release came: nothing held
            with pytest.raises(ValueError, match="idle engine"):  # a busy engine refuses a switch
                a.loop.call(lambda: engine.add_request("r2", prompt, GREEDY)).result(10)
                a.switch_role("decode")
            assert a.role == "prefill"
        finally:
            a.shutdown(5)
            b.shutdown(5)
        assert store.live_instances() == []
