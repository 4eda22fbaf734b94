"""What an engine reports about itself: full stats (on demand) and the O(1) load a heartbeat carries."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.block_pool import BlockPoolStats
from engine.step_work import StepWork


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


@dataclass(frozen=True)
class EngineCounters:
    """O(1) running totals and gauges for the stats record a heartbeat carries (metastore/instance_stats.py)."""

    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    preemptions: int
    steps: int
    step_s: float
    kv_load_fallbacks: int  # KV loads that failed, each request then prefilled locally
    requests_finished: int = 0  # requests that left the engine (done or aborted)
    prompt_tokens_finished: int = 0  # their prompt tokens
    output_tokens_finished: int = 0  # their generated tokens
    kv_loads_queued: int = 0  # KV loads that found no room and waited for it (a counter; engine/remote_kv.py)
    kv_loads_waiting: int = 0  # KV loads waiting for room now (a gauge)
    kv_lost_before_request: int = 0  # failed prefills told before their request came (a counter)
    # what the steps computed and their wall time (tokens / s: the measured token rate)
    work: StepWork = field(default_factory=StepWork)
