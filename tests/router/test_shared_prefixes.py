"""The tie-break that spreads a shared system prompt (router/shared_prefixes.py, placement's shared blocks),
through RouterService.place on an idle pool of four decode instances whose index is filled as requests run."""

from __future__ import annotations

from collections import Counter

from metastore import PlacementPolicy
from metastore.store import block_key
from router.cluster_view import ClusterView
from router.service import RouterService
from router.shared_prefixes import SharedPrefixes
from tests.router.test_service import INFO, FakeStore, inst

SYSTEM = list(range(100, 116))  # one 16-token block every conversation starts with


def conversation(c: int, blocks: int = 4) -> list[int]:
    return SYSTEM + [200 + (c * 37 + t) % 300 for t in range(16 * (blocks - 1) + 5)]


def router(fanout: int = PlacementPolicy.shared_prefix_fanout) -> RouterService:
    store = FakeStore()
    store.instances = [inst(f"d{i}", "decode") for i in range(4)]
    policy = PlacementPolicy(max_local_prefill_tokens=10_000, shared_prefix_fanout=fanout)
    view = ClusterView(store, policy)  # type: ignore[arg-type]
    view.refresh()
    return RouterService(INFO, None, view, "ns")


def run(svc: RouterService, rid: str, tokens: list[int]) -> str:
    """Place a request, then let it finish on its instance: the instance now holds its prompt's blocks."""
    svc.inflight[rid] = None
    placement = svc.place(rid, tokens)
    svc._release(rid)
    svc.view.index.store(placement.decode_instance, [block_key(h) for h in svc.hash_prompt(tokens)])
    return placement.decode_instance


def test_conversations_off_one_system_block_spread_and_follow_ups_return() -> None:
    svc = router()  # the default: a block continued in 8 ways is shared
    homes = [run(svc, f"c{c}", conversation(c)) for c in range(16)]
    assert len(set(homes)) >= 3, Counter(homes)
    assert len(set(homes[:8])) == 1  # until 8 conversations branched off it, the system block pulls them
    for c in range(16):  # each follow-up shares its conversation's first 4 blocks, then goes on
        follow_up = conversation(c)[:64] + [400 + c, 401, 402, 403] * 5
        assert run(svc, f"f{c}", follow_up) == homes[c], c


def test_without_the_rule_an_idle_pool_sends_every_conversation_to_one_instance() -> None:
    svc = router(fanout=0)  # the old tie-break: the system block's holder always wins
    homes = [run(svc, f"c{c}", conversation(c)) for c in range(16)]
    assert len(set(homes)) == 1


def test_a_block_is_shared_once_prompts_continue_it_in_fanout_ways() -> None:
    shared = SharedPrefixes(max_blocks=2)
    shared.observe([1, 2, 3], 1, fanout=2)
    assert shared.shared_blocks([1, 5], 1, fanout=2) == 0  # one continuation so far
    shared.observe([1, 5, 6], 1, fanout=2)
    assert shared.shared_blocks([1, 7], 1, fanout=2) == 1
    assert shared.shared_blocks([1, 2, 3], 3, fanout=2) == 1  # the deepest branch point within the held part
    assert shared.shared_blocks([1, 7], 1, fanout=3) == 0 and shared.shared_blocks([1, 7], 1, fanout=0) == 0
    shared.observe([1, 2, 3], 0, fanout=2)  # nothing held: nothing learnt
    shared.observe([1, 2, 3], 3, fanout=2)  # all held: no continuation
    assert len(shared) == 1
    shared.observe([8, 9], 1, fanout=2)
    shared.observe([10, 11], 1, fanout=2)  # beyond max_blocks: the least recently seen is forgotten
    assert len(shared) == 2 and shared.shared_blocks([1, 7], 1, fanout=2) == 0
