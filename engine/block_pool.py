"""The pool of physical KV blocks: reference counts, an LRU free queue, and the prefix-cache hash map.

A block is in exactly one of three states:
  - used:        ref_cnt > 0 (it may also be cached, i.e. carry a hash);
  - cached-free: ref_cnt == 0, carries a hash, sits in the free queue and can still be hit;
  - free:        ref_cnt == 0, no hash, sits in the free queue.
So `len(free_queue) == num_free + num_cached_free`, and when no request holds a block, that equals
`num_blocks`. Allocation pops the queue's head (least recently freed); a cached-free block popped that way is
evicted and a "removed" KV event is emitted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from engine.block_hash import BlockHash


@dataclass(frozen=True)
class KVEvent:
    """A change in which prefix blocks this engine holds, for the metadata store's block index."""

    kind: Literal["stored", "removed"]
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True)
class BlockPoolStats:
    num_blocks: int
    num_used: int
    num_free: int
    num_cached_free: int
    num_cached: int


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt: list[int] = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        # NOTE: OrderedDict gives O(1) removal from the middle (a prefix hit on a cached-free block) and O(1)
        # pop from the head (LRU eviction), which a deque cannot.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockHash, int] = {}
        self._events: list[KVEvent] = []

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take now (free + cached-free)."""
        return len(self.free_queue)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash)

    def stats(self) -> BlockPoolStats:
        cached_free = sum(1 for b in self.free_queue if self.block_hash[b] is not None)
        return BlockPoolStats(
            num_blocks=self.num_blocks,
            num_used=self.num_blocks - len(self.free_queue),
            num_free=len(self.free_queue) - cached_free,
            num_cached_free=cached_free,
            num_cached=len(self.cached),
        )

    # ---- mutations -----------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the head of the free queue, evicting cached ones. Caller checks capacity."""
        if n > len(self.free_queue):
            raise RuntimeError(f"allocate({n}) with only {len(self.free_queue)} free blocks")
        out: list[int] = []
        evicted: list[BlockHash] = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            h = self.block_hash[block]
            if h is not None:
                del self.cached[h]
                self.block_hash[block] = None
                evicted.append(h)
            self.ref_cnt[block] = 1
            out.append(block)
        if evicted:
            self._events.append(KVEvent("removed", tuple(evicted)))
        return out

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on blocks found in the prefix cache (pulling cached-free ones off the queue)."""
        for block in blocks:
            if self.ref_cnt[block] == 0:
                del self.free_queue[block]
            self.ref_cnt[block] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference per block; blocks reaching zero join the queue's tail in the order given.

        Callers pass a request's blocks tail-first so that a sequence's last blocks, the least likely to be
        shared, are evicted before its prefix.
        """
        for block in blocks:
            self.ref_cnt[block] -= 1
            assert self.ref_cnt[block] >= 0, f"block {block} freed more often than referenced"
            if self.ref_cnt[block] == 0:
                if self.block_hash[block] is None or not self.enable_caching:
                    self._uncache(block)
                self.free_queue[block] = None

    def cache_block(self, block: int, block_hash: BlockHash) -> None:
        """Publish a full, computed block under its hash. A duplicate hash keeps the first block."""
        if not self.enable_caching or self.block_hash[block] is not None or block_hash in self.cached:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block
        self._events.append(KVEvent("stored", (block_hash,)))

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def _uncache(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
            self._events.append(KVEvent("removed", (h,)))
