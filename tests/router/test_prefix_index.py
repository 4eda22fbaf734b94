"""The router's in-memory prefix index: leading-block overlap per instance, exact after stores, removals, drops
and slot reuse."""

from __future__ import annotations

from router.prefix_index import PrefixIndex


def test_overlap_counts_leading_blocks_per_instance() -> None:
    index = PrefixIndex()
    index.store("a", [1, 2, 3])
    index.store("b", [1, 2, 5])
    assert index.overlap([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.overlap([9, 5, 1]) == {}  # leading blocks only: nobody holds the first
    assert index.overlap([5]) == {"b": 1} and index.overlap([]) == {}
    index.remove("a", [2, 7])  # 7 was never held: ignored
    assert index.overlap([1, 2, 3]) == {"a": 1, "b": 2}
    assert index.num_blocks("a") == 2 and index.holds("a", 3) and not index.holds("a", 2)


def test_a_dropped_instance_leaves_no_entry_and_its_slot_is_reused() -> None:
    index = PrefixIndex()
    index.store("a", [1, 2])
    index.store("b", [1])
    index.drop("a")
    assert index.overlap([1, 2]) == {"b": 1} and index.instances() == ["b"]
    assert index._holders == {1: 2}  # block 2 is gone, block 1 only has b's bit
    index.store("c", [1, 2])  # takes a's freed bit
    assert index.overlap([1, 2]) == {"b": 1, "c": 2} and index._holders == {1: 3, 2: 1}
    index.replace("c", [2])
    assert index.overlap([1, 2]) == {"b": 1} and index.overlap([2]) == {"c": 1}
    index.drop("zz")  # unknown: nothing to do


def test_a_bulk_store_matches_one_by_one_and_overlap_masks_full_hashes() -> None:
    bulk, single = PrefixIndex(), PrefixIndex()
    for index in (bulk, single):
        index.store("a", list(range(0, 600, 2)))
    bulk.store("b", list(range(0, 600, 3)))  # >= BULK keys: the set-operation path, 100 of them shared with a
    for k in range(0, 600, 3):
        single.store("b", [k])
    assert bulk._holders == single._holders and bulk._blocks == single._blocks
    assert bulk.overlap([0, 6, 12, 1]) == {"a": 3, "b": 3}
    big = (0xABCD << 64) | 6  # a 128-bit hash: its key is its low 64 bits
    assert bulk.overlap([(7 << 64) | 0, big]) == {"a": 2, "b": 2} and bulk.holds("b", big)
