"""The router's own copy of the prefix-block index: which instances hold each block, answered from memory.

    block key -> bit mask of instance slots   (one int per block: a decision is a walk of dict lookups)
    instance  -> its block keys               (so that all of an instance's entries leave with it)

A block's key is the low 64 bits of its hash (metastore.store.block_key): updates take keys, `overlap` takes a
prompt's full block hashes.

`ClusterView` (router/cluster_view.py) fills it from the instances' KV event streams in Redis. A decision reads
it while that thread writes it; every read and write here is a single dict or set operation, so a reader sees
each block either before or after an event, which is all a placement hint needs.
"""

from __future__ import annotations

from collections.abc import Iterable

from metastore.store import BLOCK_KEY_MASK

BULK = 256  # keys per update from which `store` works with set operations in C instead of a Python loop


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[int, int] = {}  # block key -> mask of the slots of the instances holding it
        # instance id -> the block keys it holds. NOTE: dicts of ints to None, not sets: CPython stops tracking
        # such a dict in the garbage collector, where a set of millions of ints would be walked by every full
        # collection (tens of milliseconds, in the middle of someone's placement decision).
        self._blocks: dict[str, dict[int, None]] = {}
        self._slot: dict[str, int] = {}  # instance id -> its bit
        self._ids: list[str | None] = []  # bit -> instance id (None: free)

    def _bit(self, instance_id: str) -> int:
        slot = self._slot.get(instance_id)
        if slot is None:
            free = [i for i, iid in enumerate(self._ids) if iid is None]
            slot = free[0] if free else len(self._ids)
            if slot == len(self._ids):
                self._ids.append(None)
            self._ids[slot] = instance_id
            self._slot[instance_id] = slot
            self._blocks[instance_id] = {}
        return 1 << slot

    # ---- updates (one writer: the view's thread) ------------------------------------------------------------
    def store(self, instance_id: str, block_keys: Iterable[int]) -> None:
        bit, holders = self._bit(instance_id), self._holders
        held = self._blocks[instance_id]
        keys = block_keys if isinstance(block_keys, list) else list(block_keys)
        if len(keys) >= BULK:
            # NOTE: a snapshot brings 100,000 keys or more: keys nobody holds yet (most of them) go in with one
            # C-level update; only the shared ones take the Python loop below.
            fresh = dict.fromkeys(keys)
            shared = fresh.keys() & holders.keys()
            holders.update(dict.fromkeys(fresh.keys() - shared if shared else fresh, bit))
            held.update(fresh)
            keys = list(shared)
        for k in keys:
            holders[k] = holders.get(k, 0) | bit
            held[k] = None

    def remove(self, instance_id: str, block_keys: Iterable[int]) -> None:
        if instance_id not in self._slot:
            return
        bit, held, holders = 1 << self._slot[instance_id], self._blocks[instance_id], self._holders
        for h in block_keys:
            if h in held:
                del held[h]
                mask = holders.get(h, 0) & ~bit
                if mask:
                    holders[h] = mask
                else:
                    holders.pop(h, None)

    def drop(self, instance_id: str) -> None:
        """Forget the instance and every block it held."""
        if instance_id not in self._slot:
            return
        self.remove(instance_id, list(self._blocks[instance_id]))
        slot = self._slot.pop(instance_id)
        del self._blocks[instance_id]
        self._ids[slot] = None

    def replace(self, instance_id: str, block_keys: Iterable[int]) -> None:
        """The instance holds exactly these blocks (a snapshot read from Redis)."""
        self.drop(instance_id)
        self.store(instance_id, block_keys)

    # ---- reads ----------------------------------------------------------------------------------------------
    def instances(self) -> list[str]:
        return sorted(self._slot)

    def num_blocks(self, instance_id: str) -> int:
        return len(self._blocks.get(instance_id, ()))

    def holds(self, instance_id: str, block_hash: int) -> bool:
        return block_hash & BLOCK_KEY_MASK in self._blocks.get(instance_id, ())

    def overlap(self, block_hashes: list[int]) -> dict[str, int]:
        """For every instance holding the first block: how many leading blocks of `block_hashes` it holds."""
        holders, ids, mask = self._holders, self._ids, BLOCK_KEY_MASK
        alive = holders.get(block_hashes[0] & mask, 0) if block_hashes else 0
        out: dict[str, int] = {}
        depth = 0
        while alive:
            if depth == len(block_hashes):
                ended = alive
            else:
                still = alive & holders.get(block_hashes[depth] & mask, 0)
                ended, alive = alive & ~still, still
            while ended:  # the instances whose run of held blocks stops at `depth`
                low = ended & -ended
                iid = ids[low.bit_length() - 1]
                if iid is not None:
                    out[iid] = depth
                ended ^= low
            if depth == len(block_hashes):
                break
            depth += 1
        return out
