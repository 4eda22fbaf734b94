"""What the router knows about each instance, for operators: one typed row per live instance (its registry
entry, its state as this router sees it, its last stats record), and the Prometheus collector that exports
those rows with `instance` and `role` labels at scrape time, from memory. Instances that left the registry
disappear from the next scrape. The rows come from the cluster view (router/cluster_view.py), which reads the
instances' stats records from Redis every second: nothing here touches Redis or an instance.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import api.v1.pdserve_pb2 as pb
from metastore import InstanceInfo, InstanceStatsRecord, Load
from metastore.nodes import NodeState
from router.cluster_view import ClusterView
from router.health import InstanceHealth

SERVING, BREAKER_OPEN, MISSING_HEARTBEATS = "serving", "breaker open", "missing heartbeats"
STATES = (SERVING, BREAKER_OPEN, MISSING_HEARTBEATS)


@dataclass(frozen=True)
class InstanceRow:
    info: InstanceInfo
    state: str  # one of STATES
    restarts: int  # re-registrations with a new pid this router saw
    stats: InstanceStatsRecord  # all zero until its first stats record was read


def instance_rows(view: ClusterView, health: InstanceHealth) -> list[InstanceRow]:
    stats, rows = view.instance_stats, []
    for info in view.state.instances:
        iid = info.instance_id
        state = BREAKER_OPEN if health.is_open(iid) else MISSING_HEARTBEATS if view.heartbeats_missing(iid) \
            else SERVING
        rows.append(InstanceRow(info, state, view.restarts[iid], stats.get(iid, InstanceStatsRecord())))
    return rows


# (metric name, help, field of InstanceStatsRecord) for each gauge and counter exported per instance
_GAUGES = (
    ("pdserve:num_requests_waiting", "Requests waiting to be scheduled on the instance", "waiting"),
    ("pdserve:num_requests_running", "Requests running on the instance", "running"),
    ("pdserve:kv_cache_used_blocks", "KV blocks in use (per rank)", "kv_blocks_used"),
    ("pdserve:kv_cache_total_blocks", "KV blocks of the instance's cache (per rank)", "kv_blocks_total"),
    ("pdserve:kv_loads_waiting", "KV pulls waiting for free blocks (decode instances)", "kv_loads_waiting"),
)
_COUNTERS = (
    ("pdserve:prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
    ("pdserve:prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache", "prefix_cache_hits"),
    ("pdserve:num_preemptions", "Requests preempted (recomputed later)", "preemptions"),
    ("pdserve:engine_steps", "Engine steps", "steps"),
    ("pdserve:engine_step_seconds", "Wall time of the engine steps", "step_seconds"),
    # what the steps that computed tokens computed, in the planner's step-model terms (engine/step_work.py)
    ("pdserve:engine_work_steps", "Engine steps that computed at least one token", "work_steps"),
    ("pdserve:engine_work_seconds", "Wall time of the steps that computed at least one token", "compute_seconds"),
    ("pdserve:engine_computed_tokens", "Tokens the engine's forwards computed", "computed_tokens"),
    ("pdserve:engine_prefill_tokens", "Prompt tokens the engine's steps computed", "work_prefill_tokens"),
    ("pdserve:engine_prefill_pairs", "(query, key) pairs the prompt tokens attended to", "work_prefill_pairs"),
    ("pdserve:engine_decode_rows", "Decode rows the engine's steps computed", "work_decode_seqs"),
    ("pdserve:engine_decode_context_tokens", "Tokens the decode rows attended to", "work_decode_context"),
    ("pdserve:engine_cycles", "Steps the serving loop followed at once with another", "work_cycles"),
    ("pdserve:engine_cycle_step_seconds", "Wall time of those steps", "work_cycle_step_seconds"),
    ("pdserve:engine_cycle_seconds", "From those steps' starts to the next steps' starts (the loop's cycle)",
     "work_cycle_seconds"),
    ("pdserve:kv_transfer_bytes", "KV bytes pulled over NIXL (decode instances)", "kv_transfer_bytes"),
    ("pdserve:kv_transfer_seconds", "Time from posting a pull's READs to their completion", "kv_transfer_seconds"),
    ("pdserve:kv_transfers", "KV pulls completed", "kv_transfers"),
    ("pdserve:kv_transfer_failures", "KV pulls that failed", "kv_transfer_failures"),
    ("pdserve:kv_local_fallbacks", "Requests prefilled locally after their KV pull failed", "kv_local_fallbacks"),
    ("pdserve:kv_lease_expiries", "Held KV freed with no reader after its lease (prefill instances)",
     "kv_lease_expiries"),
    ("pdserve:kv_loads_queued", "KV pulls that found no free blocks and waited for them (decode instances)",
     "kv_loads_queued"),
    ("pdserve:kv_lost_before_request", "Streamed prefills whose failure the router told a decode instance before "
     "their request came there: each prefilled there when it came", "kv_lost_before_request"),
    ("pdserve:kv_streamed_loads", "KV pulls read layer group by layer group while the prompt computed",
     "kv_streamed_loads"),
    ("pdserve:kv_stream_tail_seconds", "Streamed pulls: from the first token's news to the last read's end",
     "kv_stream_tail_seconds"),
    ("pdserve:kv_local_copy_bytes", "Of the KV bytes pulled, those copied from same-host peers' mapped memory",
     "kv_local_copy_bytes"),
    ("pdserve:kv_local_copy_fallbacks", "KV read parts that could not take the local copy's fast path: a peer "
     "that cannot be mapped (read over NIXL), a slower copy", "kv_local_copy_fallbacks"),
    ("pdserve:kv_ack_wait_seconds", "From a pull's release to the holder's acknowledgement", "kv_ack_wait_seconds"),
    ("pdserve:kv_streams", "Prompts whose KV progress was streamed to a reader (prefill instances)", "kv_streams"),
    ("pdserve:kv_stream_messages_sent", "KV stream messages sent to readers (prefill instances)",
     "kv_stream_messages_sent"),
    ("pdserve:kv_stream_send_failures", "KV stream messages that could not be sent (prefill instances)",
     "kv_stream_send_failures"),
    ("pdserve:kv_peers_met", "Instances of the other role introduced to this one before a request between them",
     "kv_peers_met"),
    ("pdserve:kv_meet_failures", "Introduced instances this one could not prepare for (metadata, a connection): "
     "their first request does it", "kv_meet_failures"),
    ("pdserve:tp_group_restarts", "Restarts of the instance's TP group (every rank) after a lost rank",
     "tp_group_restarts"),
)


class InstanceCollector(Collector):
    """Per-instance metrics and the router's own event counters (recovery, breakers, the view's fallbacks)."""

    def __init__(self, view: ClusterView, health: InstanceHealth, events: Mapping[str, Mapping[str, int]]) -> None:
        """`events`: component -> its counters (e.g. "recovery" -> RouterService.counters)."""
        self.view, self.health, self.events = view, health, events

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rows = instance_rows(self.view, self.health)
        labels = ["instance", "role"]
        for name, doc, attr in _GAUGES:
            g = GaugeMetricFamily(name, doc, labels=labels)
            for row in rows:
                g.add_metric([row.info.instance_id, row.info.role], getattr(row.stats, attr))
            yield g
        usage = GaugeMetricFamily("pdserve:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", labels=labels)
        hit = GaugeMetricFamily("pdserve:prefix_cache_hit_rate", "Prompt tokens found / looked up, since start",
                                labels=labels)
        state = GaugeMetricFamily("pdserve:instance_state", "1 for the instance's state as this router sees it",
                                  labels=[*labels, "state"])
        restarts = CounterMetricFamily("pdserve:instance_restarts", "Re-registrations with a new pid seen by this "
                                       "router", labels=labels)
        for row in rows:
            key, s = [row.info.instance_id, row.info.role], row.stats
            usage.add_metric(key, s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
            hit.add_metric(key, s.prefix_cache_hit_rate)
            for st in STATES:
                state.add_metric([*key, st], float(row.state == st))
            restarts.add_metric(key, row.restarts)
        yield from (usage, hit, state, restarts)
        for name, doc, attr in _COUNTERS:
            c = CounterMetricFamily(name, doc, labels=labels)
            for row in rows:
                c.add_metric([row.info.instance_id, row.info.role], getattr(row.stats, attr))
            yield c
        lost = CounterMetricFamily("pdserve:nodes_lost", "Ray nodes `pdserve serve` saw alive and then lost "
                                   "(its node watcher's records)")
        lost.add_metric([], sum(n.state == NodeState.LOST for n in self.view.nodes))
        yield lost
        ev = CounterMetricFamily("pdserve:router_events", "The router's recovery, breaker and metadata-store "
                                 "fallback events", labels=["component", "event"])
        for component, counters in self.events.items():
            for event, n in sorted(dict(counters).items()):
                ev.add_metric([component, event], n)
        yield ev


def loads_response(view: ClusterView, health: InstanceHealth) -> pb.GetLoadsResponse:
    """GetLoads' answer: every live instance's load and state, and the active policy."""
    state = view.state  # NOTE: as placement sees it (refreshed every view.refresh_s)
    rows = []
    for row in instance_rows(view, health):
        i, st, load = row.info, row.stats, state.loads.get(row.info.instance_id, Load())
        rows.append(pb.InstanceLoad(
            instance_id=i.instance_id, role=i.role, waiting=load.waiting, running=load.running,
            kv_usage=load.kv_usage, tensor_parallel_size=i.tp_size, host=i.host, pid=i.pid, state=row.state,
            prefix_cache_hit_rate=st.prefix_cache_hit_rate, restarts=row.restarts,
            kv_blocks_used=st.kv_blocks_used, kv_blocks_total=st.kv_blocks_total))
    nodes = [pb.NodeStatus(node_id=n.node_id, node_ip=n.node_ip, state=n.state.value, lost_at=n.lost_at,
                           instances=[pb.NodeInstance(instance_id=i.instance_id, role=i.role, state=i.state)
                                      for i in n.instances]) for n in view.nodes]
    return pb.GetLoadsResponse(instances=rows, policy=state.policy.to_redis(), nodes=nodes)
