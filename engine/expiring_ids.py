"""What an instance was told about a request before the request itself came: Ray does not keep an async actor's
calls in order (an argument still being resolved holds a call back while later ones run), so a router's word on a
request can overtake the request. Such notes are kept here, by request id, for when the request comes. A note on
a request that already ended is kept too and expires unused: notes are bounded in age and number, the oldest
going first."""

from __future__ import annotations

import time

NOTE_TTL_S = 60.0  # NOTE: reordered calls arrive within milliseconds of each other; late notes must not pile up
MAX_NOTES = 4096


class ExpiringIds:
    """Request ids, each kept NOTE_TTL_S after it was added, at most MAX_NOTES of them."""

    def __init__(self) -> None:
        self._added: dict[str, float] = {}  # request id -> when added; insertion order: oldest first

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._added.pop(request_id, None)  # NOTE: a second note on one request counts from now, at the end
        while self._added and (len(self._added) >= MAX_NOTES or next(iter(self._added.values())) < now - NOTE_TTL_S):
            del self._added[next(iter(self._added))]  # NOTE: a note came after its request, or was never used
        self._added[request_id] = now

    def take(self, request_id: str) -> bool:
        """Whether the id was added in the last NOTE_TTL_S; it is removed either way."""
        added = self._added.pop(request_id, None)
        return added is not None and added >= time.monotonic() - NOTE_TTL_S

    def __bool__(self) -> bool:
        return bool(self._added)

    def keys(self) -> list[str]:
        return list(self._added)
