"""KVConsumer (the decode side) pulling over real NIXL from a prefill worker in another process: equal tokens to a
single engine, only the blocks the local prefix cache lacks, heterogeneous TP (split and replicated KV heads), aborts,
a killed or frozen peer."""

from __future__ import annotations

import os
import pathlib
import signal
import time

import pytest

from kv_transfer import TransferConfig
from tests.kv_transfer.conftest import NEW, connector, decode, greedy
from tests.model_factory import hf_greedy, random_prompts


def test_cross_process_pull_equals_single_engine(models: dict[str, pathlib.Path], prefill_factory,
                                                 consumer_factory) -> None:
    model = models["llama"]
    prefill = prefill_factory(model)
    consumer = consumer_factory(model)
    for i, n in enumerate([1, 15, 16, 17, 64, 130, 200]):
        prompt = random_prompts(1, [n], 512, seed=100 + i)[0]
        handle = (prefill.call("prefill", f"p{i}", prompt))
        assert len(handle.block_ids) == -(-n // 16)
        tokens = decode(consumer, f"d{i}", prompt, handle)
        assert tokens == hf_greedy(model, prompt, NEW), f"prompt length {n}"
    assert connector(consumer).counters["fallbacks"] == 0 and connector(consumer).counters["transfers"] == 7
    assert prefill.call("wait_released", 10) == 0
    stats = prefill.call("stats")
    assert stats["used"] == 0 and stats["counters"]["released"] == 7


def test_partial_prefix_hit_transfers_only_missing_blocks(models: dict[str, pathlib.Path], prefill_factory,
                                                          consumer_factory) -> None:
    model = models["qwen2"]
    prefill = prefill_factory(model)
    consumer = consumer_factory(model)
    shared = random_prompts(1, [64], 512, seed=110)[0]  # 4 full blocks
    first = shared + random_prompts(1, [40], 512, seed=111)[0]  # 104 tokens: 7 blocks
    second = shared + random_prompts(1, [50], 512, seed=112)[0]  # 114 tokens: 8 blocks
    h1 = (prefill.call("prefill", "a", first))
    assert decode(consumer, "a", first, h1) == hf_greedy(model, first, NEW)
    assert connector(consumer).counters["blocks_transferred"] == 7
    h2 = (prefill.call("prefill", "b", second))
    assert len(h2.block_ids) == 8
    tokens = decode(consumer, "b", second, h2)
    assert tokens == hf_greedy(model, second, NEW)
    # The 4 shared blocks were in b's prefix cache: only the other 4 crossed.
    assert connector(consumer).counters["blocks_cached_locally"] == 4
    assert connector(consumer).counters["blocks_transferred"] == 7 + 4
    assert prefill.call("wait_released", 10) == 0


@pytest.mark.parametrize("how", ["prepared", "per-read", "local-copy"])
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 2), (2, 1)])
def test_heterogeneous_tp(models: dict[str, pathlib.Path], prefill_factory, consumer_factory,
                          prefill_tp: int, decode_tp: int, how: str) -> None:
    """Every way of reading: by block index from the NIXL lists prepared once per peer, from NIXL descriptor rows
    built for the read, and (same host, CPU) by memcpy from the holder's shared KV memory."""
    model = models["mistral"]
    local = how == "local-copy"
    prefill = prefill_factory(model, {"local_copy": local}, tensor_parallel_size=prefill_tp)
    consumer = consumer_factory(model, tensor_parallel_size=decode_tp,
                                cfg=TransferConfig(prepared_descriptors=how == "prepared", local_copy=local))
    for i, n in enumerate([7, 48, 150]):
        prompt = random_prompts(1, [n], 512, seed=120 + i)[0]
        handle = (prefill.call("prefill", f"h{i}", prompt))
        assert len(handle.agents) == prefill_tp
        assert decode(consumer, f"h{i}", prompt, handle) == hf_greedy(model, prompt, NEW), f"length {n}"
    assert connector(consumer).counters["fallbacks"] == 0
    # TP 1 -> 2: each decode rank reads its head half of every block: one piece per block, group and rank.
    # TP 2 -> 1: the decode rank reads every block from both prefill ranks.
    blocks = sum(-(-n // 16) for n in (7, 48, 150))
    groups = handle.agents[0].num_layer_groups
    assert groups == 2  # the 2-layer model at the default kv_layer_groups (4): one group per layer
    assert connector(consumer).counters["descriptors"] == 2 * blocks * groups
    counters = connector(consumer).counters
    assert counters["local_copy_bytes"] == (counters["bytes_transferred"] if local else 0)
    assert counters["bytes_transferred"] > 0
    assert counters["local_copy_fallbacks"] == 0
    agent = connector(consumer).agent
    assert (agent.local_peers.peers != {}) == local
    assert all(peer is not None for peer in agent.local_peers.peers.values())
    assert prefill.call("wait_released", 10) == 0


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 2), (2, 1)])
def test_heterogeneous_tp_with_replicated_kv_heads(models: dict[str, pathlib.Path], prefill_factory,
                                                   consumer_factory, prefill_tp: int, decode_tp: int) -> None:
    """One KV head (MQA): TP 2 holds it on both ranks. 1 -> 2: each decode rank reads the head into its own
    cache; 2 -> 1: the decode rank reads it from one prefill replica, not from both."""
    model = models["llama_mqa"]
    prefill = prefill_factory(model, tensor_parallel_size=prefill_tp)
    consumer = consumer_factory(model, tensor_parallel_size=decode_tp)
    lengths = [7, 48, 150]
    for i, n in enumerate(lengths):
        prompt = random_prompts(1, [n], 512, seed=170 + i)[0]
        handle = prefill.call("prefill", f"m{i}", prompt)
        assert len(handle.agents) == prefill_tp and {a.num_kv_heads for a in handle.agents} == {1}
        assert decode(consumer, f"m{i}", prompt, handle) == hf_greedy(model, prompt, NEW), f"length {n}"
    counters = connector(consumer).counters
    assert counters["fallbacks"] == 0 and counters["transfers"] == len(lengths)
    blocks = sum(-(-n // 16) for n in lengths)
    head_bytes = 2 * 2 * 16 * 16 * 4  # layers · K/V · block_size · head_dim · float32
    # Every decode rank gets every block of the one head exactly once (a second replica would double this).
    assert counters["bytes_transferred"] == decode_tp * blocks * head_bytes
    # Whole 1-head blocks on both sides coalesce: both fresh engines give each request a run of adjacent block
    # ids, so each request is one descriptor per layer group (2) and decode rank.
    assert counters["descriptors"] == decode_tp * len(lengths) * 2
    assert prefill.call("wait_released", 10) == 0


def test_abort_before_during_and_after_transfer(models: dict[str, pathlib.Path], prefill_factory,
                                                consumer_factory) -> None:
    model = models["llama"]
    prefill = prefill_factory(model)
    consumer = consumer_factory(model)
    prompts = random_prompts(4, [120, 200, 60, 33], 512, seed=140)
    handles = [(prefill.call("prefill", f"x{i}", p)) for i, p in enumerate(prompts)]

    # Before: the prefill side aborts its held request; the reader's result is refused, it falls back.
    assert prefill.call("abort", "x0") == "ok"
    decode(consumer, "x0", prompts[0], handles[0])
    assert connector(consumer).counters["fallback_released"] == 1

    # During: the decode side aborts while its read is in flight; both sides free everything.
    assert consumer.add_request("x1", prompts[1], greedy(), kv_source=handles[1]) == 13  # ceil(200 / 16)
    consumer.abort_request("x1")
    deadline = time.monotonic() + 10
    finished = {}
    while consumer.has_unfinished_requests() and time.monotonic() < deadline:
        finished.update({o.request_id: o for o in consumer.step() if o.finished})
    assert finished["x1"].finish_reason == "abort" and connector(consumer).counters["cancelled"] == 1

    # After: loaded and decoding, then aborted.
    consumer.add_request("x2", prompts[2], greedy(200), kv_source=handles[2])
    while consumer.stats().num_running == 0:
        consumer.step()
    consumer.step()
    consumer.abort_request("x2")
    while consumer.has_unfinished_requests():
        consumer.step()

    # A decode-side abort right after the reads were posted: the holder is still told to release.
    consumer.add_request("x3", prompts[3], greedy(), kv_source=handles[3])
    consumer.abort_request("x3")
    while consumer.has_unfinished_requests():
        consumer.step()
    assert prefill.call("wait_released", 10) == 0
    assert prefill.call("stats")["used"] == 0


def test_killed_prefill_peer_gives_typed_error_within_bound(models: dict[str, pathlib.Path], prefill_factory,
                                                            consumer_factory) -> None:
    model = models["llama"]
    prefill = prefill_factory(model)
    consumer = consumer_factory(model, cfg=TransferConfig(transfer_timeout_s=5.0, ack_timeout_s=2.0))
    warm = random_prompts(1, [20], 512, seed=150)[0]
    decode(consumer, "warm", warm, (prefill.call("prefill", "warm", warm)))
    prompt = random_prompts(1, [180], 512, seed=151)[0]
    handle = (prefill.call("prefill", "dead", prompt))
    os.kill(prefill.proc.pid, signal.SIGKILL)
    prefill.proc.join(10)
    start = time.monotonic()
    tokens = decode(consumer, "dead", prompt, handle)
    assert time.monotonic() - start < 10
    # UCX reports the disconnect (~0.1 s here) as a PeerGoneError (its counter is fallback_peer)
    assert connector(consumer).counters["fallbacks"] == 1 and connector(consumer).counters["fallback_peer"] == 1
    assert tokens == hf_greedy(model, prompt, NEW)


def test_frozen_peer_times_out_and_blocks_stay_quarantined_until_settled(
        models: dict[str, pathlib.Path], prefill_factory, consumer_factory) -> None:
    model = models["llama"]
    prefill = prefill_factory(model)
    consumer = consumer_factory(model, cfg=TransferConfig(transfer_timeout_s=1.0, ack_timeout_s=1.0))
    # NOTE: no warm-up read: the first read to a peer needs its side of the connection handshake, so against
    # a frozen peer the READ itself stays in flight (once connected, a shared-memory read would complete).
    prompt = random_prompts(1, [200], 512, seed=161)[0]
    handle = (prefill.call("prefill", "frozen", prompt))
    os.kill(prefill.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        tokens = decode(consumer, "frozen", prompt, handle)
        elapsed = time.monotonic() - start
    finally:
        os.kill(prefill.proc.pid, signal.SIGCONT)
    assert connector(consumer).counters["fallback_timeout"] == 1  # a TransferTimeoutError
    assert connector(consumer).unsettled  # the stuck read may still write: its blocks are quarantined, not reused
    assert consumer.remote is not None and consumer.remote.quarantined
    assert 1.0 <= elapsed < 10
    assert tokens == hf_greedy(model, prompt, NEW)  # prefilled locally
    # Once the peer runs again the stuck read settles; only then are its blocks freed.
    deadline = time.monotonic() + 10
    while consumer.has_unfinished_requests() and time.monotonic() < deadline:
        consumer.step()
    assert not connector(consumer).unsettled and not consumer.remote.quarantined
    assert prefill.call("wait_released", 10) == 0
