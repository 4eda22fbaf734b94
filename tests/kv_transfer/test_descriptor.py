"""The agent descriptor: its JSON wire format round-trips and is validated; pairs whose KV caches are not
interchangeable are refused naming the field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kv_transfer.descriptor import AgentDescriptor, check_compatible
from kv_transfer.errors import IncompatibleKVError
from tests.kv_transfer.conftest import HEAD, desc


def test_descriptor_json_round_trip_and_validation() -> None:
    d = desc(0, 1, 123)
    assert AgentDescriptor.from_json(d.to_json()) == d
    assert "agent_metadata" in json.loads(d.to_json())
    bad = json.loads(d.to_json())
    bad["base_addr"] = "123"
    with pytest.raises(ValueError, match="base_addr"):
        AgentDescriptor.from_dict(bad)
    bad = json.loads(d.to_json())
    bad["version"] = 99
    with pytest.raises(IncompatibleKVError, match="version"):
        AgentDescriptor.from_dict(bad)


@pytest.mark.parametrize(("field", "value"), [("model_fingerprint", "other"), ("dtype", "bfloat16"),
                                              ("block_size", 32), ("layout", "layer,block")])
def test_incompatible_pairs_are_refused_naming_the_field(field: str, value: object) -> None:
    a = desc(0, 1, 0)
    b = dataclasses.replace(desc(0, 1, 0, name="p"), **{field: value})
    with pytest.raises(IncompatibleKVError, match=field):
        check_compatible(a, b)


def test_replicated_heads_pair_and_a_wrong_head_count_is_refused() -> None:
    """A side at TP above its KV heads holds one head per rank (replicated); anything else is refused."""
    check_compatible(desc(1, 2, 0, heads=1), desc(0, 1, 0, heads=1, name="p"))  # MQA: TP 2 reads TP 1
    check_compatible(desc(3, 4, 0, heads=2), desc(1, 2, 0, heads=2, name="p"))
    two_heads = dataclasses.replace(desc(1, 2, 0, heads=1), num_kv_heads=2, block_bytes=2 * HEAD)
    with pytest.raises(IncompatibleKVError, match="holds 2 KV heads; 1 expected of 1 over TP 2"):
        check_compatible(two_heads, desc(0, 1, 0, heads=1, name="p"))
    uneven = dataclasses.replace(desc(0, 1, 0, heads=6, name="p"), tp_size=4, num_kv_heads=1)
    with pytest.raises(IncompatibleKVError, match="neither divides nor is a multiple"):
        check_compatible(desc(0, 1, 0, heads=6), uneven)


def test_a_share_that_cannot_be_mapped_is_read_over_nixl_and_counted() -> None:
    """A same-host peer whose memory cannot be mapped (its process is gone, or the share is malformed) is not an
    error: open_peer says so (None), logs, and counts; the agent then reads that peer over NIXL."""
    import torch

    from kv_transfer import local_copy

    gone = dataclasses.replace(desc(0, 1, 0), share=f"memfd:{2**22 + 7}:3")  # no such pid
    bad = dataclasses.replace(desc(0, 1, 0), share="memfd:x:3")
    vram = dataclasses.replace(desc(0, 1, 0), share="cudaipc:e30=")  # a GPU peer's share, for a CPU reader
    before = local_copy.unavailable
    cpu, me, mine = torch.device("cpu"), desc(0, 1, 0), torch.zeros(0, dtype=torch.uint8).numpy()
    assert local_copy.open_peer(me, mine, gone, cpu) is None and local_copy.open_peer(me, mine, bad, cpu) is None
    assert local_copy.open_peer(me, mine, vram, cpu) is None
    assert local_copy.unavailable == before + 3
