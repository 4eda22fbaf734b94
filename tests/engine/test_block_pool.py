"""BlockPool: exact block ids, LRU eviction order, reference counts and KV events on a tiny pool."""

from engine.block_pool import BlockPool, KVEvent


def test_allocate_takes_lowest_ids_first_and_free_returns_to_tail() -> None:
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.free([1, 0])  # tail first, as the cache manager does
    assert list(pool.free_queue) == [2, 3, 1, 0]
    assert pool.allocate(3) == [2, 3, 1]


def test_cached_free_blocks_are_evicted_lru_with_removed_events() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache_block(a, 0xA)
    pool.cache_block(b, 0xB)
    assert pool.take_events() == [KVEvent("stored", (0xA,)), KVEvent("stored", (0xB,))]
    pool.free([b])
    pool.free([a])
    pool.free([c])
    s = pool.stats()
    assert (s.num_used, s.num_free, s.num_cached_free) == (0, 1, 2)
    # Free queue order is b, a, c: b (cached) is evicted first, then a.
    assert pool.allocate(1) == [b]
    assert pool.take_events() == [KVEvent("removed", (0xB,))]
    assert pool.lookup(0xB) is None and pool.lookup(0xA) == a


def test_touch_revives_cached_free_block_and_shares_it() -> None:
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.cache_block(a, 7)
    pool.free([a])
    pool.touch([a])
    pool.touch([a])
    assert pool.ref_cnt[a] == 2 and a not in pool.free_queue
    pool.free([a])
    assert a not in pool.free_queue
    pool.free([a])
    assert list(pool.free_queue) == [1, a] and pool.lookup(7) == a


def test_duplicate_hash_keeps_first_block_and_uncached_free_emits_nothing() -> None:
    pool = BlockPool(2, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache_block(a, 5)
    pool.cache_block(b, 5)
    assert pool.lookup(5) == a and pool.block_hash[b] is None
    pool.take_events()
    pool.free([b, a])
    assert pool.take_events() == []
    assert pool.stats().num_cached_free == 1


def test_caching_disabled_stores_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, 1)
    pool.free([a])
    assert pool.lookup(1) is None and pool.take_events() == []
