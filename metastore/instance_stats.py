"""The stats record an instance publishes with every heartbeat (`{ns}:stats:{id}`, TTL = lease): the counters
and gauges the router exports per instance (router/instance_metrics.py). O(1) to build: no walk of any queue.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from engine.step_work import StepWork


@dataclass(frozen=True)
class InstanceStatsRecord:
    heartbeat_seq: int = 0  # 1, 2, ... per publisher: a reader that sees it stand still knows heartbeats stopped
    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (counter)
    prefix_cache_hits: int = 0  # of those, tokens found (counter)
    preemptions: int = 0  # counter
    steps: int = 0  # engine steps (counter)
    step_seconds: float = 0.0  # wall time of those steps (counter)
    kv_transfer_bytes: int = 0  # bytes pulled over NIXL (decode; counter)
    kv_transfer_seconds: float = 0.0  # time from posting the READs to their completion (decode; counter)
    kv_transfers: int = 0  # pulls completed (decode; counter)
    kv_transfer_failures: int = 0  # pulls that failed, each then prefilled locally (decode; counter)
    kv_local_fallbacks: int = 0  # requests prefilled locally after a failed pull (decode; counter)
    kv_lease_expiries: int = 0  # held KV freed because no reader came within its lease (prefill; counter)
    kv_loads_queued: int = 0  # pulls that found no free blocks and waited for them (decode; counter)
    kv_loads_waiting: int = 0  # pulls waiting for free blocks now (decode; gauge)
    kv_lost_before_request: int = 0  # failed streamed prefills told before their request came (decode; counter)
    kv_streamed_loads: int = 0  # pulls streamed layer group by layer group while their prompt computed (counter)
    kv_stream_tail_seconds: float = 0.0  # streamed pulls: from the first token's news to the last read done (counter)
    kv_local_copy_bytes: int = 0  # of kv_transfer_bytes, copied from same-host peers' mapped memory (decode; counter)
    kv_local_copy_fallbacks: int = 0  # read parts that could not take the local copy's fast path (decode; counter)
    kv_ack_wait_seconds: float = 0.0  # from a pull's release to the holder's acknowledgement (decode; counter)
    kv_streams: int = 0  # prompts whose KV progress was streamed to a reader (prefill; counter)
    kv_stream_messages_sent: int = 0  # stream messages sent to readers (prefill; counter)
    kv_stream_send_failures: int = 0  # stream messages that could not be sent (prefill; counter)
    kv_peers_met: int = 0  # instances of the other role introduced before a request between them (counter)
    kv_meet_failures: int = 0  # ... that could not be prepared then (their first request does it; counter)
    computed_tokens: int = 0  # tokens its forwards computed (counter)
    compute_seconds: float = 0.0  # wall time of the steps that computed them (counter): the measured token rate
    # what those steps computed, in the planner's step-model terms (counters; engine/step_work.py)
    work_steps: int = 0
    work_prefill_tokens: int = 0
    work_prefill_pairs: int = 0
    work_decode_seqs: int = 0
    work_decode_context: int = 0
    work_cycles: int = 0  # of those steps, the ones the serving loop followed at once with another
    work_cycle_step_seconds: float = 0.0  # their own wall time
    work_cycle_seconds: float = 0.0  # from their start to the next step's start
    requests_finished: int = 0  # requests that left the engine, done or aborted (counter)
    prompt_tokens_finished: int = 0  # their prompt tokens (counter)
    output_tokens_finished: int = 0  # their generated tokens (counter)
    tp_group_restarts: int = 0  # restarts of the instance's TP group after a lost rank (counter, across restarts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> InstanceStatsRecord:
        """Unknown keys (a newer instance) are ignored, missing ones (an older one) default."""
        raw = json.loads(text)
        names = {f.name for f in fields(InstanceStatsRecord)}
        return InstanceStatsRecord(**{k: v for k, v in raw.items() if k in names})

    @property
    def work(self) -> StepWork:
        return StepWork(self.work_steps, self.computed_tokens, self.work_prefill_tokens, self.work_prefill_pairs,
                        self.work_decode_seqs, self.work_decode_context, self.compute_seconds, self.work_cycles,
                        self.work_cycle_step_seconds, self.work_cycle_seconds)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
