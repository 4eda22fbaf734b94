"""Block hashes are chained, salted and stable across processes (no Python hash())."""

import subprocess
import sys

from engine.block_hash import hash_block, hash_blocks, root_hash


def test_chain_covers_full_blocks_only_and_depends_on_parent() -> None:
    ids = list(range(40))
    hs = hash_blocks(ids, 16, "salt")
    assert len(hs) == 2
    assert hs[0] == hash_block(root_hash("salt"), ids[:16])
    assert hs[1] == hash_block(hs[0], ids[16:32])
    # Same tokens under another parent, or another salt, hash differently.
    assert hash_block(root_hash("salt"), ids[16:32]) != hs[1]
    assert hash_blocks(ids, 16, "other")[0] != hs[0]
    # Incremental extension equals hashing from scratch.
    assert hash_blocks(ids + list(range(8)), 16, "salt", parent=hs[1], start=32) == hash_blocks(
        ids + list(range(8)), 16, "salt")[2:]


def test_stable_across_processes_and_hash_seeds() -> None:
    code = "from engine.block_hash import hash_blocks; print(hash_blocks(list(range(64)), 16, 's'))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(hash_blocks(list(range(64)), 16, "s"))
