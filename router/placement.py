"""Where a request runs: the decode instance, and whether (and where) its prompt is prefilled remotely.

Cost of a candidate instance, lower is better:

    cost = load_weight · load − overlap_weight · (cached prompt tokens there / prompt tokens)
    load = (waiting + running) / max_num_seqs + kv_weight · KV usage

Conditional disaggregation: the effective prefill length is the prompt minus the tokens already cached on the
chosen decode instance. It is prefilled locally (on the decode instance) when that is at most
`max_local_prefill_tokens`, or when the prefill pool is saturated (every prefill instance has at least
`prefill_queue_threshold` requests waiting), or when there is no prefill instance; otherwise the cheapest prefill
instance computes it and the decode instance pulls the KV.
"""

from __future__ import annotations

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


def load_of(info: InstanceInfo, load: Load, policy: PlacementPolicy) -> float:
    return (load.waiting + load.running) / max(1, info.max_num_seqs) + policy.kv_weight * load.kv_usage


def _cheapest(instances: list[InstanceInfo], overlaps: dict[str, int], loads: dict[str, Load], prompt_len: int,
              policy: PlacementPolicy) -> tuple[InstanceInfo, int]:
    def cost(info: InstanceInfo) -> tuple[float, str]:
        cached = cached_tokens(overlaps.get(info.instance_id, 0), info.block_size, prompt_len)
        score = (policy.load_weight * load_of(info, loads.get(info.instance_id, Load()), policy)
                 - policy.overlap_weight * cached / prompt_len)
        return score, info.instance_id  # the id breaks ties deterministically

    best = min(instances, key=cost)
    return best, cached_tokens(overlaps.get(best.instance_id, 0), best.block_size, prompt_len)


def place(prompt_len: int, decodes: list[InstanceInfo], prefills: list[InstanceInfo], overlaps: dict[str, int],
          loads: dict[str, Load], policy: PlacementPolicy) -> Placement:
    """Choose for a prompt of `prompt_len` tokens; `overlaps` is MetadataStore.prefix_overlap of its blocks."""
    if prompt_len < 1:
        raise ValueError("prompt is empty")
    if not decodes:
        raise NoInstanceError("no healthy decode instance")
    decode, cached = _cheapest(decodes, overlaps, loads, prompt_len, policy)
    effective = prompt_len - cached
    if effective <= policy.max_local_prefill_tokens:
        reason = f"local: {effective} uncached tokens <= max_local_prefill_tokens {policy.max_local_prefill_tokens}"
        return Placement(decode.instance_id, None, cached, effective, reason)
    if not prefills:
        return Placement(decode.instance_id, None, cached, effective, "local: no prefill instance")
    if all(loads.get(p.instance_id, Load()).waiting >= policy.prefill_queue_threshold for p in prefills):
        reason = f"local: prefill pool saturated (every queue >= {policy.prefill_queue_threshold})"
        return Placement(decode.instance_id, None, cached, effective, reason)
    prefill, _ = _cheapest(prefills, overlaps, loads, prompt_len, policy)
    return Placement(decode.instance_id, prefill.instance_id, cached, effective,
                     f"remote: {effective} uncached tokens on {decode.instance_id}")
