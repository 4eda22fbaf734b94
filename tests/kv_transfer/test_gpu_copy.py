"""Same-host GPU reads of whole KV units (kv_transfer/gpu_copy.py): the runs a read is cut into, and the copy
and gather paths (fast and fallback) byte for byte. The GPU cases run where CUDA is (the device runs)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kv_transfer import gather_kernel, gpu_copy
from kv_transfer.gpu_copy import IndexSlots, block_runs, copy_bytes, gather_units, unit_pairs
from kv_transfer.local_copy import LocalPeer, LocalPeers
from tests.kv_transfer.conftest import desc

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
@pytest.mark.parametrize("words", [9001, 9002])  # 8-byte and 16-byte words; 4 programs a unit, the last partial
@pytest.mark.parametrize("fast", [True, False])
def test_copy_bytes_and_gather_units_copy_exactly_the_named_units(fast: bool, words: int, monkeypatch) -> None:
    if not fast:  # the fallbacks: torch copy_ per run, torch index_select + index_copy_
        monkeypatch.setattr(gpu_copy, "driver", lambda: None)
        monkeypatch.setattr(gather_kernel, "kernel_for", lambda index: None)
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
    slots = IndexSlots(dst.device)
    for i in range(5):  # through the pinned slots (each reused), then through torch's copy
        dst.zero_()
        k = 8 if i == 2 else 10
        done = gather_units(stream, dst, src, unit, li[:k], ri[:k], range(1), 64, 64, slots if i < 4 else None)
        done.event.synchronize()
        assert torch.equal(dst, _expected(torch.zeros_like(dst), src, words, li[:k], ri[:k]))
        assert done.fallback is not fast
    grew = {k: gpu_copy.fallbacks[k] - before[k] for k in before}
    assert grew == ({"torch_copy": 0, "torch_gather": 0} if fast else {"torch_copy": 1, "torch_gather": 5})


@gpu
def test_a_gather_kernel_that_fails_to_launch_is_dropped_and_the_read_still_lands(monkeypatch) -> None:
    words = 1024
    src, dst = _caches(16, words)
    kernel = gather_kernel.kernel_for(torch.cuda.current_device())
    assert kernel is not None

    def refuse(*args, **kwargs) -> None:
        raise RuntimeError("cuLaunchKernel failed: CUDA driver error 98")

    monkeypatch.setattr(kernel, "launch", refuse)
    monkeypatch.setitem(gather_kernel._kernels, torch.cuda.current_device(), kernel)
    before = gpu_copy.fallbacks["torch_gather"]
    done = gather_units(torch.cuda.Stream(), dst, src, words * 8, [1, 2, 7], [9, 3, 0], range(1), 16, 16)
    done.event.synchronize()
    assert torch.equal(dst, _expected(torch.zeros_like(dst), src, words, [1, 2, 7], [9, 3, 0]))
    assert done.fallback and gpu_copy.fallbacks["torch_gather"] == before + 1
    assert gather_kernel.kernel_for(torch.cuda.current_device()) is None  # dropped: torch's gather from now on


def test_the_gather_word_divides_the_unit_and_both_addresses() -> None:
    assert gpu_copy._word(2 << 20, 0, 1 << 30) == 16
    assert gpu_copy._word(72008, 0, 0) == 8  # 9001 int64 words
    assert gpu_copy._word(2 << 20, 8, 0) == 8
    assert gpu_copy._word(4100, 0, 0) == 0  # torch's gather, byte rows


def _peer(nl: int, nr: int, groups: int, unit: int, device: str = "cpu") -> LocalPeer:
    """A LocalPeer over two caches of this process (no CUDA IPC): `memory` the remote's, `local_bytes` ours."""
    peer = object.__new__(LocalPeer)
    peer.local = dataclasses.replace(desc(0, 1, 0), num_blocks=nl, block_bytes=unit, num_layer_groups=groups)
    peer.remote = dataclasses.replace(desc(0, 1, 1 << 30), num_blocks=nr, block_bytes=unit, num_layer_groups=groups)
    peer.memory = torch.randint(0, 256, (groups * nr * unit,), dtype=torch.uint8, device=device)
    peer.local_bytes = torch.zeros(groups * nl * unit, dtype=torch.uint8, device=device)
    peer.whole_units = True
    if device != "cpu":
        peer.stream, peer.device_index = torch.cuda.Stream(), torch.cuda.current_device()
        peer.index_slots = IndexSlots(torch.device(device))
    return peer


@pytest.mark.parametrize(("local", "remote", "groups"), [
    ([0, 64], [1, 2], range(1)),  # a local id past the cache
    ([0, 1], [2, -1], range(1)),  # a negative remote id
    ([0, 1], [2, 80], range(1)),  # a remote id past its cache (80 blocks)
    ([0, 1], [2, 3], range(0, 3)),  # a layer group that does not exist
])
def test_a_read_by_raw_pointers_refuses_ids_outside_either_cache(local: list[int], remote: list[int],
                                                                  groups: range) -> None:
    peer = _peer(64, 80, 2, 64)
    with pytest.raises(ValueError, match="out of range"):
        peer.read_units(local, remote, groups)


def test_default_local_copies_skip_peers_that_hold_other_heads() -> None:
    me = dataclasses.replace(desc(0, 1, 0), share="memfd:1:3")
    half = dataclasses.replace(desc(0, 2, 1 << 20, name="h"), share="memfd:1:3")  # TP 2: half the heads
    whole = dataclasses.replace(desc(0, 1, 1 << 20, name="w"), share=f"memfd:{2**22 + 7}:3")  # no such process
    cpu = torch.device("cpu")
    peers = LocalPeers(me, np.zeros(0, dtype=np.uint8), cpu, enabled=True, auto=True)
    assert peers.wanted(half) and peers.get(half) is None and not peers.wanted(half)  # skipped, not a fallback
    assert peers.get(whole) is None and peers.wanted(whole)  # could not be mapped: a counted fallback
    forced = LocalPeers(me, np.zeros(0, dtype=np.uint8), cpu, enabled=True, auto=False)
    assert forced.get(half) is None and forced.wanted(half)  # asked for: mapping tried (and failed)


@gpu
def test_read_units_copies_each_groups_units_between_caches_of_other_sizes() -> None:
    unit = 8 * 1000
    peer = _peer(40, 50, 3, unit, "cuda")
    want = peer.local_bytes.clone().view(3, 40, unit)
    src = peer.memory.view(3, 50, unit)
    few = ([5, 6, 7, 20, 21], [40, 41, 42, 3, 4])  # 2 runs x 2 groups: copies
    many = (list(range(0, 36, 2)), list(range(49, 13, -2)))  # 18 runs x 2 groups: the gather
    for lb, rb in (few, many):
        done = peer.read_units(lb, rb, range(1, 3))
        for e in done.events:
            e.synchronize()
        for g in (1, 2):
            want[g, lb] = src[g, rb]
        assert torch.equal(peer.local_bytes.view(3, 40, unit), want)
        assert done.num_bytes == 2 * len(lb) * unit and done.fallbacks == 0


@gpu
def test_copy_events_report_pending_and_slots_are_not_reused_while_read() -> None:
    src, dst = _caches(8, 512)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the copy on this stream
    done = copy_bytes(stream, dst, src, [(0, 0, 4096)])
    assert not done.event.query()
    done.event.synchronize()
    assert done.event.query()
    slots = IndexSlots(dst.device)
    drv = gpu_copy.driver()
    assert drv is not None
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)
    first, local, remote = slots.upload(drv, stream, [1, 2, 3], [4, 5, 6])
    stream.synchronize()
    on_device = slots.slots[first][3]
    assert (local, remote) == (on_device.data_ptr(), on_device.data_ptr() + 24)
    assert on_device[:6].tolist() == [1, 2, 3, 4, 5, 6]
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)
    pending = gpu_copy.CopyEvent(drv, stream.cuda_stream)
    slots.used(first, pending)
    second, _, _ = slots.upload(drv, stream, [7], [8])
    assert second != first  # the first is still being read
    pending.synchronize()
    third, _, _ = slots.upload(drv, stream, [9], [10])
    assert third == first
