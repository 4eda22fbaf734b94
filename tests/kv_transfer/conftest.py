"""Helpers and fixtures of the KV-transfer tests: a decode engine with the NIXL connector in this process
(`consumer_factory`), a prefill worker in another (`prefill_factory`, tests/kv_transfer/prefill_process.py),
`decode` to pull and decode one request, and `desc`, an agent descriptor with exact addresses."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kv_heads import KVHeadSplit
from kv_transfer import KVConsumer, KVHandle, NixlConnectorSpec, TransferConfig
from kv_transfer.descriptor import PROTOCOL_VERSION, AgentDescriptor
from tests.conftest import assert_all_free, device_for_tp
from tests.kv_transfer.prefill_process import PrefillProcess

NEW = 16  # tokens decoded per request
HEAD = 1000  # head_bytes of `desc`: one KV head of one block


def greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def connector(engine: LLMEngine) -> KVConsumer:
    assert engine.remote is not None and isinstance(engine.remote.connector, KVConsumer)
    return engine.remote.connector


@pytest.fixture
def consumer_factory() -> Iterator:
    made: list[LLMEngine] = []

    def make(model: pathlib.Path, cfg: TransferConfig | None = None, **kwargs: object) -> LLMEngine:
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("kv_cache_memory_bytes", 64 << 20)
        kwargs.setdefault("device", device_for_tp(2))
        engine = LLMEngine(EngineConfig(model=str(model), **kwargs),  # type: ignore[arg-type]
                           NixlConnectorSpec("decode", "decode", cfg or TransferConfig()))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        try:
            settle(engine)
            assert not connector(engine).unsettled and engine.remote is not None and not engine.remote.quarantined
            assert_all_free(engine)
        finally:
            engine.shutdown()


@pytest.fixture
def prefill_factory() -> Iterator:
    made: list[PrefillProcess] = []

    def make(model: pathlib.Path, cfg_kwargs: dict[str, object] | None = None, **kwargs: object) -> PrefillProcess:
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("kv_cache_memory_bytes", 64 << 20)
        kwargs.setdefault("device", device_for_tp(2))
        p = PrefillProcess(str(model), kwargs, cfg_kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def settle(engine: LLMEngine, timeout: float = 5) -> None:
    """Step an engine with no request left until its connector's work is done too (a cancelled read settling, a
    release being flushed out: kv_transfer/consumer.py)."""
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.001)


def decode(engine: LLMEngine, rid: str, prompt: list[int], handle: KVHandle, n: int = NEW,
           timeout: float = 60) -> list[int]:
    engine.add_request(rid, prompt, greedy(n), kv_source=handle)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.token_ids
    raise AssertionError(f"request {rid} did not finish")


def desc(rank: int, size: int, base: int, heads: int = 4, name: str = "x") -> AgentDescriptor:
    """Rank `rank` of a TP-`size` agent over `heads` KV heads (replicated when size > heads), allocation at
    `base`, each KV head of each block HEAD bytes."""
    local = KVHeadSplit(heads, size, rank).count
    return AgentDescriptor(
        version=PROTOCOL_VERSION, engine_id=name, agent_name=f"{name}{rank}", agent_metadata=b"md",
        mem_type="DRAM", device_id=0, base_addr=base, num_blocks=64, block_size=16, block_bytes=local * HEAD,
        head_bytes=HEAD, num_kv_heads=local, total_kv_heads=heads, num_layers=2, head_dim=8, tp_rank=rank,
        tp_size=size, dtype="float32", model_fingerprint="f")
