"""A request's priority class: which requests go first when an engine or a router has more than it can serve.

The class travels with the request from the front door (an HTTP body's `priority`, a GenerateRequest's field, or,
once API keys exist, the key's class) to the engine: the scheduler admits waiting requests by (class, arrival)
and preempts the lowest class first; the router's admission predicts a request's TTFT from the work queued
ahead of it in its class or a higher one (router/admission.py).
"""

from __future__ import annotations

import enum


class Priority(enum.IntEnum):
    """Lower value = served first."""

    INTERACTIVE = 0
    BATCH = 1

    @classmethod
    def parse(cls, name: str) -> Priority:
        """'interactive' or 'batch' (any case); ValueError names the valid classes."""
        try:
            return cls[name.upper()]
        except (KeyError, AttributeError):  # AttributeError: not a string
            raise ValueError(f"priority must be one of {', '.join(p.name.lower() for p in cls)}, got {name!r}") \
                from None

    @property
    def label(self) -> str:
        return self.name.lower()
