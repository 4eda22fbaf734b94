"""What an engine reports about itself: full stats (on demand) and the O(1) load a heartbeat carries."""

from __future__ import annotations

from dataclasses import dataclass

from engine.block_pool import BlockPoolStats


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv: BlockPoolStats
    kv_usage: float
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens served from cache
    num_preemptions: int
    num_held: int  # finished requests whose blocks wait for a reader (prefill role)


@dataclass(frozen=True)
class EngineLoad:
    """O(1) figures for heartbeats (stats() walks the free queue)."""

    waiting: int
    running: int
    kv_usage: float
    queued_prefill_tokens: int  # tokens of waiting requests still to compute
