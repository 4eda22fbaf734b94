"""KVProducer (the prefill side, in its own process over real NIXL): held blocks are freed when their lease
expires, and a reader that comes late falls back to computing the prefill itself."""

from __future__ import annotations

import base64
import pathlib
import time

from kv_transfer.messages import ReleaseAck, ReleaseRequest
from tests.kv_transfer.conftest import NEW, connector, decode
from tests.model_factory import hf_greedy, random_prompts


def test_lease_expiry_frees_blocks_and_a_late_reader_falls_back(models: dict[str, pathlib.Path],
                                                                prefill_factory, consumer_factory) -> None:
    model = models["llama"]
    prefill = prefill_factory(model, cfg_kwargs={"held_kv_lease_s": 0.5})
    consumer = consumer_factory(model)
    prompt = random_prompts(1, [90], 512, seed=130)[0]
    handle = (prefill.call("prefill", "late", prompt))
    time.sleep(1.0)
    stats = prefill.call("stats")
    assert stats["counters"].get("lease_expired") == 1 and stats["used"] == 0 and stats["held"] == 0
    tokens = decode(consumer, "late", prompt, handle)
    assert connector(consumer).counters["fallbacks"] == 1 and connector(consumer).counters["fallback_released"] == 1
    assert tokens == hf_greedy(model, prompt, NEW)  # computed locally instead


def test_malformed_notifications_are_counted_and_never_stop_the_holder(models: dict[str, pathlib.Path],
                                                                       prefill_factory, consumer_factory) -> None:
    model = models["llama"]
    prefill = prefill_factory(model)
    consumer = consumer_factory(model)
    prompt = random_prompts(1, [40], 512, seed=131)[0]
    handle = prefill.call("prefill", "a", prompt)
    assert decode(consumer, "a", prompt, handle) == hf_greedy(model, prompt, NEW)  # the peers know each other now
    agent = connector(consumer).agent
    junk = [b"\xff\xfe not json", b'{"op": "release"}', ReleaseAck("x", "a", True).encode(),  # wrong message kind
            ReleaseRequest("a", "bogus", base64.b64encode(b"not NIXL metadata").decode()).encode()]
    for raw in junk:
        assert agent.send(handle.holder, raw) is None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and prefill.call("stats")["counters"].get("bad_messages", 0) < len(junk):
        time.sleep(0.05)
    assert prefill.call("stats")["counters"]["bad_messages"] == len(junk)
    second = random_prompts(1, [40], 512, seed=132)[0]  # and it still serves
    assert decode(consumer, "b", second, prefill.call("prefill", "b", second)) == hf_greedy(model, second, NEW)
