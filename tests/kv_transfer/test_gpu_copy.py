"""Same-host GPU reads of whole KV units (kv_transfer/gpu_copy.py): the runs a read is cut into, and the copy
and gather paths (fast and fallback) byte for byte. The GPU cases run where CUDA is (the device runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_transfer import gpu_copy
from kv_transfer.gpu_copy import IndexSlots, block_runs, copy_bytes, gather_units, unit_pairs

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_block_runs_cut_where_either_side_jumps() -> None:
    local = [0, 1, 2, 3, 10, 11, 12, 5]
    remote = [7, 8, 4, 5, 6, 7, 9, 10]
    assert block_runs(local, remote) == [(0, 7, 2), (2, 4, 2), (10, 6, 2), (12, 9, 1), (5, 10, 1)]
    assert block_runs([], []) == []
    assert block_runs([4], [9]) == [(4, 9, 1)]
    assert block_runs(list(range(5, 37)), list(range(100, 132))) == [(5, 100, 32)]
    with pytest.raises(ValueError):
        block_runs([1, 2], [3])


def test_unit_pairs_name_each_groups_units_in_memory_order() -> None:
    pairs = unit_pairs([3, 4], [9, 1], range(1, 3), 10, 100)
    assert pairs.tolist() == [[13, 14, 23, 24], [109, 101, 209, 201]]
    assert pairs.dtype == np.int64


def _caches(units: int, words: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(-2**62, 2**62, (units * words,), dtype=torch.int64, device="cuda").view(torch.uint8)
    return src, torch.zeros_like(src)


def _expected(dst: torch.Tensor, src: torch.Tensor, words: int, li: list[int], ri: list[int]) -> torch.Tensor:
    out = dst.clone().view(torch.int64).view(-1, words)
    out[torch.tensor(li, device="cuda")] = src.view(torch.int64).view(-1, words)[torch.tensor(ri, device="cuda")]
    return out.view(torch.uint8).view(-1)


@gpu
@pytest.mark.parametrize("fast", [True, False])
def test_copy_bytes_and_gather_units_copy_exactly_the_named_units(fast: bool, monkeypatch) -> None:
    if not fast:  # the fallbacks: torch copy_ per run, torch index_select + index_copy_
        monkeypatch.setattr(gpu_copy, "driver", lambda: None)
        monkeypatch.setattr(gpu_copy, "_triton_gather", lambda: None)
    words = 3000  # not a multiple of the gather's block: the tail is masked
    unit = words * 8
    src, dst = _caches(64, words)
    li = [3, 4, 5, 6, 20, 21, 40, 9, 10, 11]
    ri = [50, 51, 52, 53, 0, 1, 17, 30, 31, 32]
    stream = torch.cuda.Stream()
    before = dict(gpu_copy.fallbacks)
    want = _expected(dst, src, words, li, ri)
    copies = [(lb * unit, rb * unit, k * unit) for lb, rb, k in block_runs(li, ri)]
    assert len(copies) == 4
    done = copy_bytes(stream, dst, src, copies)
    done.event.synchronize()
    assert done.event.query() and torch.equal(dst, want) and done.fallback is not fast
    slots = IndexSlots(dst.device, slots=2)
    for i in range(5):  # through the pinned slots (each reused), then through torch's copy
        dst.zero_()
        pairs = np.array([li, ri], dtype=np.int64)[:, :8 if i == 2 else 10]
        done = gather_units(stream, dst, src, unit, pairs, slots if i < 4 else None)
        done.event.synchronize()
        assert torch.equal(dst, _expected(torch.zeros_like(dst), src, words, li[:pairs.shape[1]],
                                          ri[:pairs.shape[1]])) and done.fallback is not fast
    grew = {k: gpu_copy.fallbacks[k] - before[k] for k in before}
    assert grew == ({"torch_copy": 0, "torch_gather": 0} if fast else {"torch_copy": 1, "torch_gather": 5})
