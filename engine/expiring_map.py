"""What an instance was told about a request before the request itself came: Ray does not keep an async actor's
calls in order (an argument still being resolved holds a call back while later ones run), so a router's word on a
request can overtake the request. Such notes are kept here, by request id, for when the request comes. A note on
a request that already ended is kept too and expires unused: notes are bounded in age and number, the oldest
going first."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

V = TypeVar("V")

NOTE_TTL_S = 60.0  # NOTE: reordered calls arrive within milliseconds of each other; late notes must not pile up
MAX_NOTES = 4096


class ExpiringMap(Generic[V]):
    """Values by request id, each kept NOTE_TTL_S after it was put, at most MAX_NOTES of them."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[float, V]] = {}  # insertion order: oldest first

    def put(self, request_id: str, value: V) -> None:
        now = time.monotonic()
        self._items.pop(request_id, None)  # NOTE: a second note on one request counts from now, at the end
        while self._items and (len(self._items) >= MAX_NOTES
                               or next(iter(self._items.values()))[0] < now - NOTE_TTL_S):
            del self._items[next(iter(self._items))]  # NOTE: a note came after its request, or was never used
        self._items[request_id] = (now, value)

    def pop(self, request_id: str) -> V | None:
        """The request's note if one came in the last NOTE_TTL_S, removed; else None."""
        item = self._items.pop(request_id, None)
        if item is None or item[0] < time.monotonic() - NOTE_TTL_S:
            return None
        return item[1]

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def keys(self) -> list[str]:
        return list(self._items)
