"""Maps requests to physical KV blocks: prefix-cache lookup, slot allocation, publication and release."""

from __future__ import annotations

from engine.block_pool import BlockPool, BlockPoolStats, KVEvent
from engine.request import Request


class KVCacheManager:
    """Owns the BlockPool. Contract: every block a request holds is in `request.block_ids`, in token order,
    and is released exactly once by `free(request)`; so after all requests finish the pool is all free."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, salt: str) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.salt = salt
        self.pool = BlockPool(num_blocks, enable_caching)
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Blocks of the longest cached prefix of `request` (never all of it: the last token must be computed
        to produce logits). Takes no reference; pass the result to `allocate_slots`."""
        if not self.enable_caching or request.num_computed_tokens > 0:
            return []
        request.update_block_hashes(self.block_size, self.salt)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[int] = (),
                       keep_free: int = 0) -> bool:
        """Make room for `num_new_tokens` beyond the request's computed tokens (plus `computed_blocks`, prefix
        hits prepended to a request that holds no blocks yet). Returns False, changing nothing, if the pool
        cannot supply the blocks and still have `keep_free` left."""
        bs = self.block_size
        num_computed = request.num_computed_tokens + len(computed_blocks) * bs
        need = -(-(num_computed + num_new_tokens) // bs) - len(request.block_ids) - len(computed_blocks)
        # NOTE: hits on cached-free blocks leave the free queue when touched, so they count against capacity.
        reclaimed = sum(1 for b in computed_blocks if self.pool.ref_cnt[b] == 0)
        if max(need, 0) + keep_free > self.pool.num_free_blocks - reclaimed:
            return False
        if computed_blocks:
            assert not request.block_ids, "prefix hits are only prepended to a request holding no blocks"
            self.pool.touch(computed_blocks)
            request.block_ids.extend(computed_blocks)
        if need > 0:
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's newly completed full blocks to the prefix cache (after they were computed)."""
        if not self.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= request.num_cached_blocks:
            return
        request.update_block_hashes(self.block_size, self.salt)
        for i in range(request.num_cached_blocks, num_full):
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i])
        request.num_cached_blocks = num_full

    def free(self, request: Request) -> None:
        """Release every block the request holds, tail first (see BlockPool.free)."""
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_cached_blocks = 0

    def take_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def stats(self) -> BlockPoolStats:
        return self.pool.stats()

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks
