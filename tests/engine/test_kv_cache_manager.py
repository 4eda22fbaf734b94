"""KVCacheManager: prefix hits over full blocks, capacity checks, publication and release."""

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def req(ids: list[int], arrival: int = 0) -> Request:
    return Request(f"r{arrival}", ids, SamplingParams(max_tokens=4), arrival)


def test_prefix_hit_reuses_exact_blocks_but_never_the_last_token() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True, salt="t")
    a = req(list(range(10)))
    assert kv.get_computed_blocks(a) == []
    assert kv.allocate_slots(a, 10)
    assert a.block_ids == [0, 1, 2]
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)  # blocks 0 and 1 are full; block 2 holds 2 tokens
    assert a.num_cached_blocks == 2

    b = req(list(range(8)) + [99, 98, 97], arrival=1)
    assert kv.get_computed_blocks(b) == [0, 1]
    # An exact repeat of 8 tokens may only reuse 1 block: the 8th token must be computed for logits.
    assert kv.get_computed_blocks(req(list(range(8)), arrival=2)) == [0]
    assert kv.prefix_hits == 8 + 4

    assert kv.allocate_slots(b, 3, [0, 1])
    assert b.block_ids == [0, 1, 3]
    assert kv.pool.ref_cnt[:4] == [2, 2, 1, 1]
    kv.free(a)
    kv.free(b)
    s = kv.stats()
    assert (s.num_used, s.num_cached_free, s.num_free) == (0, 2, 6)


def test_allocate_fails_without_side_effects_when_full() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_caching=True, salt="t")
    a = req(list(range(12)))
    assert kv.allocate_slots(a, 12)
    b = req(list(range(20, 25)), arrival=1)
    assert not kv.allocate_slots(b, 5)
    assert b.block_ids == [] and kv.pool.num_free_blocks == 0


def test_hits_on_cached_free_blocks_count_against_capacity() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_caching=True, salt="t")
    a = req(list(range(9)))
    assert kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    kv.free(a)  # blocks 0, 1 cached-free; 2 free
    b = req(list(range(8)) + [50, 51, 52, 53, 54], arrival=1)  # 13 tokens -> 4 blocks > 3
    hits = kv.get_computed_blocks(b)
    assert hits == [0, 1]
    assert not kv.allocate_slots(b, 5, hits)
    assert kv.pool.ref_cnt == [0, 0, 0]
    assert kv.allocate_slots(b, 4, hits)  # 12 tokens fit
    assert b.block_ids == [0, 1, 2]
    kv.free(b)
