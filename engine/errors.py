"""Errors the engine raises to its callers, matched by type across process boundaries (Ray keeps the type)."""

from __future__ import annotations


class NoKVSpaceError(RuntimeError):
    """The KV cache has no free blocks for this request's prompt right now (the router answers
    RESOURCE_EXHAUSTED). Retrying later, or on another instance, may succeed."""
