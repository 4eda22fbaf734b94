"""KVHeadSplit: which KV heads each TP rank holds, split or replicated, and that every rank's query heads
(its slice of the attention heads) use exactly the KV heads it holds."""

from __future__ import annotations

import pytest

from engine.kv_heads import KVHeadSplit, check_kv_head_split


@pytest.mark.parametrize(("total", "tp", "expected"), [
    (8, 1, [[0, 1, 2, 3, 4, 5, 6, 7]]),
    (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (2, 2, [[0], [1]]),
    (1, 2, [[0], [0]]),  # MQA at TP 2: both ranks hold the one head
    (2, 4, [[0], [0], [1], [1]]),
    (4, 8, [[0], [0], [1], [1], [2], [2], [3], [3]]),
    (1, 8, [[0]] * 8),
])
def test_heads_of_every_rank(total: int, tp: int, expected: list[list[int]]) -> None:
    splits = [KVHeadSplit(total, tp, r) for r in range(tp)]
    assert [list(s.heads) for s in splits] == expected
    assert {s.replicas for s in splits} == {max(1, tp // total)}
    assert {s.count for s in splits} == {len(expected[0])}


@pytest.mark.parametrize("num_heads", [8, 16, 32])
@pytest.mark.parametrize("total", [1, 2, 4, 8])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_each_ranks_query_heads_use_exactly_its_kv_heads(num_heads: int, total: int, tp: int) -> None:
    """GQA: query head q uses KV head q // (num_heads / total) in the unsharded model; rank r computes query
    heads [r·num_heads/tp, (r+1)·num_heads/tp), and must hold every KV head they use and no other."""
    if num_heads % tp:
        pytest.skip("the config refuses a TP size that does not divide the attention heads")
    group = num_heads // total
    per_rank = num_heads // tp
    for r in range(tp):
        split = KVHeadSplit(total, tp, r)
        used = sorted({q // group for q in range(r * per_rank, (r + 1) * per_rank)})
        assert used == list(split.heads), (r, used, list(split.heads))


@pytest.mark.parametrize(("total", "tp"), [(3, 2), (6, 4), (12, 8), (3, 8)])
def test_tp_neither_dividing_nor_a_multiple_is_refused_naming_both(total: int, tp: int) -> None:
    with pytest.raises(ValueError, match=rf"tensor_parallel_size: {tp} neither divides nor is a multiple of the "
                                         rf"model's num_key_value_heads \({total}\)"):
        check_kv_head_split(total, tp)
    with pytest.raises(ValueError, match="neither divides"):
        KVHeadSplit(total, tp, 0)


def test_rank_outside_the_group_is_refused() -> None:
    with pytest.raises(ValueError, match="tp_rank 2"):
        KVHeadSplit(2, 2, 2)
