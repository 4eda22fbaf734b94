"""Which prompt prefixes are shared by many conversations (a common system prompt), learnt from the prompts this
router places.

A prompt's blocks `h[0..n)` meet the index at depth D: the deepest run of leading blocks any instance holds.
When 0 < D < n the prompt branches off a cached prefix at block D-1: it continues with block D, which nobody
holds. The tracker remembers, per block, the distinct blocks prompts continued with after it (capped at the
policy's `shared_prefix_fanout`). A block with that many continuations is a branch point: the prefix ending
there is shared. For a prompt, `shared_blocks` is the length of its longest prefix that ends at a branch point;
placement gives those blocks no affinity credit and keys the tie-break on the block after them.

    sys ── a1 ── a2        conversations a, b, c share one system block `sys`; after a and b branched off
        ├─ b1 ── b2        it, `sys` is a branch point: c (and every new conversation) spreads by its own
        └─ c1              first block, while a's follow-ups keep their credit for a1, a2 on a's instance.

NOTE: learnt per router, from the prompts it places, not shared through Redis: a new router relearns a branch
point after `shared_prefix_fanout` prompts off it, and until then places as plain affinity would. The memory
is bounded: the least recently seen blocks are forgotten beyond `max_blocks`.
"""

from __future__ import annotations

from collections import OrderedDict


class SharedPrefixes:
    def __init__(self, max_blocks: int = 65_536) -> None:
        self.max_blocks = max_blocks
        self._continuations: OrderedDict[int, set[int]] = OrderedDict()  # block -> distinct next blocks (capped)

    def observe(self, block_hashes: list[int], depth: int, fanout: int) -> None:
        """A prompt whose leading `depth` blocks are held somewhere (and the next is not) is being placed."""
        if fanout < 1 or not 0 < depth < len(block_hashes):
            return
        parent = block_hashes[depth - 1]
        seen = self._continuations.get(parent)
        if seen is None:
            seen = self._continuations[parent] = set()
            if len(self._continuations) > self.max_blocks:
                self._continuations.popitem(last=False)
        else:
            self._continuations.move_to_end(parent)
        if len(seen) < fanout:
            seen.add(block_hashes[depth])

    def shared_blocks(self, block_hashes: list[int], depth: int, fanout: int) -> int:
        """How many leading blocks of the prompt (at most `depth`, the held part) form a shared prefix."""
        if fanout < 1:
            return 0
        continuations = self._continuations
        for i in range(min(depth, len(block_hashes)) - 1, -1, -1):
            seen = continuations.get(block_hashes[i])
            if seen is not None and len(seen) >= fanout:
                return i + 1
        return 0

    def __len__(self) -> int:
        return len(self._continuations)
