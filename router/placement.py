"""Where a request runs: the decode instance, and whether (and where) its prompt is prefilled remotely.

Cost of a candidate instance, lower is better:

    cost = load_weight · load − overlap_weight · (cached prompt tokens there / prompt tokens)
    load = (waiting + running) / max_num_seqs + kv_weight · KV usage

Blocks of a shared prefix earn no credit: when the prompt's leading `shared_blocks` are a prefix that many
conversations branch off (a common system prompt; router/shared_prefixes.py), the credit counts only the
cached tokens past it. Otherwise the first instance to hold a system prompt would pull every new conversation,
and an idle pool would serve them all on one instance.

Ties (idle instances, nothing cached past the shared part) are broken by rendezvous hashing of the affinity key
with the instance id: the prompt's first block past its shared prefix. A new conversation gets a stable "home"
instance, different conversations spread over the pool, and the follow-ups of a conversation go where its
blocks will be even before the block index shows them.

Conditional disaggregation: the effective prefill length is the prompt minus the tokens already cached on the
chosen decode instance. It is prefilled locally (on the decode instance) when that is at most
`max_local_prefill_tokens`, or when the prefill pool is saturated (every prefill instance has at least
`prefill_queue_threshold` requests waiting), or when every prefill instance has at least
`max_prefill_queue_tokens` prompt tokens queued and the decode instance has fewer, or when there is no prefill
instance; otherwise the cheapest prefill instance computes it and the decode instance pulls the KV.

Queued prefill tokens of an instance are the larger of its last heartbeat's figure and the tokens this router
has sent it whose prefill has not finished: heartbeats lag a burst by up to a period, and by then the queued
prompts may already have spent the TTFT budget.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from metastore.policy import PlacementPolicy
from metastore.store import InstanceInfo, Load


class NoInstanceError(RuntimeError):
    """No healthy decode instance is registered (gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class Placement:
    decode_instance: str
    prefill_instance: str | None  # None: prefill on the decode instance itself
    cached_tokens: int  # prompt tokens already cached on the decode instance
    effective_prefill_tokens: int  # prompt tokens that must be computed
    reason: str  # why local or remote (for logs and the response's routing info)

    @property
    def disaggregated(self) -> bool:
        return self.prefill_instance is not None


def cached_tokens(blocks: int, block_size: int, prompt_len: int) -> int:
    """Tokens an instance can reuse: whole cached blocks, never the last prompt token (it must be computed)."""
    return min(blocks * block_size, prompt_len - 1)


def rendezvous(affinity_key: int, instance_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{affinity_key:x}:{instance_id}".encode(), digest_size=8).digest(), "big")


_IDLE = Load()


def _cheapest(instances: list[InstanceInfo], overlaps: dict[str, int], loads: dict[str, Load], prompt_len: int,
              policy: PlacementPolicy, inflight: dict[str, int], affinity_key: int,
              shared_blocks: int) -> tuple[InstanceInfo, int]:
    """The candidate of least cost, and the prompt tokens cached there.
    NOTE: one pass of plain arithmetic per candidate, rendezvous hashing only among exact ties: a decision over
    64 instances must take well under a millisecond (bench/router_overhead.py)."""
    best: list[InstanceInfo] = []
    best_cost = float("inf")
    lw, ow, kw = policy.load_weight, policy.overlap_weight, policy.kv_weight
    for info in instances:
        iid = info.instance_id
        load = loads.get(iid, _IDLE)
        requests = max(load.waiting + load.running, inflight.get(iid, 0))
        cost = lw * (requests / max(1, info.max_num_seqs) + kw * load.kv_usage)
        blocks = overlaps.get(iid, 0)
        if blocks > shared_blocks:
            credit = cached_tokens(blocks, info.block_size, prompt_len) - shared_blocks * info.block_size
            cost -= ow * max(0, credit) / prompt_len
        if cost < best_cost - 1e-9:  # NOTE: a tolerance, so that float noise does not break a tie
            best, best_cost = [info], cost
        elif cost <= best_cost + 1e-9:
            best.append(info)
    chosen = best[0] if len(best) == 1 else min(best, key=lambda i: rendezvous(affinity_key, i.instance_id))
    return chosen, cached_tokens(overlaps.get(chosen.instance_id, 0), chosen.block_size, prompt_len)


def place(prompt_len: int, decodes: list[InstanceInfo], prefills: list[InstanceInfo], overlaps: dict[str, int],
          loads: dict[str, Load], policy: PlacementPolicy, inflight: dict[str, int] | None = None,
          affinity_key: int = 0, pending_prefill: dict[str, int] | None = None,
          shared_blocks: int = 0) -> Placement:
    """Choose for a prompt of `prompt_len` tokens; `overlaps` is the prefix overlap of its blocks per instance
    (PrefixIndex.overlap), `inflight` the router's unfinished requests per instance, `affinity_key` the hash of
    its first block past the shared prefix, `pending_prefill` the prompt tokens the router has sent each
    instance whose prefill has not finished, `shared_blocks` the leading blocks that are a shared prefix."""
    inflight = inflight or {}
    pending_prefill = pending_prefill or {}

    def queued(iid: str) -> int:
        return max(loads.get(iid, Load()).queued_prefill_tokens, pending_prefill.get(iid, 0))

    if prompt_len < 1:
        raise ValueError("prompt is empty")
    if not decodes:
        raise NoInstanceError("no healthy decode instance")
    decode, cached = _cheapest(decodes, overlaps, loads, prompt_len, policy, inflight, affinity_key,
                               shared_blocks)
    effective = prompt_len - cached
    if effective <= policy.max_local_prefill_tokens:
        reason = f"local: {effective} uncached tokens <= max_local_prefill_tokens {policy.max_local_prefill_tokens}"
        return Placement(decode.instance_id, None, cached, effective, reason)
    if not prefills:
        return Placement(decode.instance_id, None, cached, effective, "local: no prefill instance")
    if all(loads.get(p.instance_id, Load()).waiting >= policy.prefill_queue_threshold for p in prefills):
        reason = f"local: prefill pool saturated (every queue >= {policy.prefill_queue_threshold})"
        return Placement(decode.instance_id, None, cached, effective, reason)
    if policy.max_prefill_queue_tokens > 0:
        shortest = min(queued(p.instance_id) for p in prefills)
        if shortest >= policy.max_prefill_queue_tokens and queued(decode.instance_id) < shortest:
            reason = (f"local: {shortest} tokens queued at the least loaded prefill instance (>= "
                      f"max_prefill_queue_tokens {policy.max_prefill_queue_tokens}), {queued(decode.instance_id)} here")
            return Placement(decode.instance_id, None, cached, effective, reason)
    prefill, _ = _cheapest(prefills, overlaps, loads, prompt_len, policy, inflight, affinity_key, shared_blocks)
    return Placement(decode.instance_id, prefill.instance_id, cached, effective,
                     f"remote: {effective} uncached tokens on {decode.instance_id}")
