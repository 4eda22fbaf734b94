"""The decode actor (its class called directly, without Ray): a slow stream consumer gets every token, merged
into fewer items."""

from __future__ import annotations

import asyncio
import pathlib

from decode_worker.actor import DecodeActor
from engine import EngineConfig, SamplingParams
from instance.messages import StreamDelta
from kv_transfer import TransferConfig
from metastore import RedisServer
from tests.model_factory import hf_greedy, random_prompts


def test_slow_stream_consumer_gets_every_token_in_fewer_items(models: dict[str, pathlib.Path]) -> None:
    """The real actor class (called directly, without Ray) over a tiny model: a consumer that sleeps 50 ms per
    item receives the greedy tokens exactly, in fewer items than tokens."""
    prompt = random_prompts(1, [30], 512, seed=310)[0]
    with RedisServer() as redis:
        config = EngineConfig(model=str(models["llama"]), dtype="float32", kv_cache_memory_bytes=16 << 20)
        actor = DecodeActor("d-stream", config, TransferConfig(), redis.url, "stream", 5.0)

        async def consume() -> list[StreamDelta]:
            items = []
            params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
            async for item in actor.generate("r", prompt, params):
                items.append(item)
                await asyncio.sleep(0.05)
            return items

        try:
            items = asyncio.run(consume())
            stats = actor.stats()
        finally:
            actor.shutdown()
    assert [t for it in items for t in it.token_ids] == hf_greedy(models["llama"], prompt, 24)
    assert items[-1].finished and not any(it.finished for it in items[:-1])
    assert items[-1].transferred_blocks == 0 and items[-1].finish_reason == "length"
    assert len(items) < 24 and all(it.token_ids for it in items)
    assert stats.stream["stream_outputs"] == 24 and stats.stream["stream_items"] == len(items)
