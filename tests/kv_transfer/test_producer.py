"""KVProducer (the prefill side, in its own process over real NIXL): held blocks are freed when their lease
expires, and a reader that comes late falls back to computing the prefill itself."""

from __future__ import annotations

import pathlib
import time

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
