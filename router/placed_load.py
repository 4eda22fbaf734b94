"""The load this router has placed and not yet seen finish, per instance: what placement adds to the
instances' heartbeats, which lag a burst by up to a heartbeat period.

    requests_on[instance]  requests placed there (decode or prefill) and not yet finished
    pending_on[instance]   prompt tokens sent there whose prefill has not finished
                           (until the prefill returns, or a local prefill's first token)

Counts that reach zero are removed, so both maps hold only busy instances. Not thread-safe: the router updates
it under its placement lock.
"""

from __future__ import annotations

from router.placement import Placement


def _add(counts: dict[str, int], instance_id: str, n: int) -> None:
    left = counts.get(instance_id, 0) + n
    if left:
        counts[instance_id] = left
    else:
        counts.pop(instance_id, None)


class PlacedLoad:
    def __init__(self) -> None:
        self.requests_on: dict[str, int] = {}
        self.pending_on: dict[str, int] = {}
        self.prefill_pending: dict[str, tuple[str, int]] = {}  # request -> (instance, prompt tokens)

    def placed(self, request_id: str, placement: Placement, before: Placement | None) -> None:
        """The request runs at `placement` now (`before`: where it ran until now, when re-placed)."""
        self._unplace(request_id, before)
        for iid in (placement.decode_instance, placement.prefill_instance):
            if iid:
                _add(self.requests_on, iid, 1)
        target = placement.prefill_instance or placement.decode_instance
        self.prefill_pending[request_id] = (target, placement.effective_prefill_tokens)
        _add(self.pending_on, target, placement.effective_prefill_tokens)

    def prefill_finished(self, request_id: str) -> None:
        pending = self.prefill_pending.pop(request_id, None)
        if pending is not None:
            _add(self.pending_on, pending[0], -pending[1])

    def finished(self, request_id: str, placement: Placement | None) -> None:
        """The request placed at `placement` (None: not placed) is over."""
        self._unplace(request_id, placement)

    def _unplace(self, request_id: str, placement: Placement | None) -> None:
        if placement is not None:
            for iid in (placement.decode_instance, placement.prefill_instance):
                if iid:
                    _add(self.requests_on, iid, -1)
        self.prefill_finished(request_id)
