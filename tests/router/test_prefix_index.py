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
