"""`pdserve apply`: what differs between the running serving configuration and an edited one, sorted into what
applies live (pool sizes through scaling, placement parameters through the metadata store's policy) and what
takes a restart of `pdserve serve` (everything else, listed by dotted key)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pdserve.config import ServingConfig


@dataclass
class ConfigDiff:
    replicas: dict[str, int] = field(default_factory=dict)  # role -> new replica count (changed ones only)
    policy: dict[str, Any] = field(default_factory=dict)  # placement field -> new value (changed ones only)
    needs_restart: list[str] = field(default_factory=list)  # "key: old -> new", sorted by key


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A configuration (dataclasses within dataclasses) as dotted key -> leaf value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.init:
                out.update(flatten(getattr(value, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix[:-1]: value}


def diff(running: ServingConfig, edited: ServingConfig) -> ConfigDiff:
    """`running`: the live configuration (its pool sizes and policy as they are now, not as started)."""
    old, new = flatten(running), flatten(edited)
    out = ConfigDiff()
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        section, _, name = key.partition(".")
        if key in ("pools.prefill.replicas", "pools.decode.replicas"):
            out.replicas[key.split(".")[1]] = after
        elif section == "placement":
            out.policy[name] = after
        else:
            out.needs_restart.append(f"{key}: {before!r} -> {after!r}")
    return out
