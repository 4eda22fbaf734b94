"""The prefill role's KV connector: holds each finished request's blocks for a reader, under a lease, and
answers the reader's release (kv_transfer/spec.py has the protocol)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from engine.kv_connector import KVConnector, KVConnectorEvents, KVRanks
from engine.request import Request
from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.handle import KVHandle
from kv_transfer.messages import ReleaseAck, ReleaseRequest, decode_message

if TYPE_CHECKING:
    from kv_transfer.agent import TransferAgent

log = logging.getLogger(__name__)


class KVProducer(KVConnector):
    def __init__(self, ranks: KVRanks, agent: TransferAgent, descriptors: list[AgentDescriptor], engine_id: str,
                 cfg: TransferConfig) -> None:
        self.agent, self.descriptors, self.engine_id, self.cfg = agent, descriptors, engine_id, cfg
        self.leases: dict[str, float] = {}  # request id -> deadline (monotonic) of its held blocks
        self.counters: Counter[str] = Counter()

    def request_finished(self, request: Request) -> KVHandle:
        self.leases[request.request_id] = time.monotonic() + self.cfg.held_kv_lease_s
        return KVHandle(self.engine_id, request.request_id, list(request.block_ids), request.num_prompt_tokens,
                        request.output_token_ids[0], self.descriptors)

    def drop_held(self, request_id: str) -> None:
        if self.leases.pop(request_id, None) is not None:
            self.counters["aborted_held"] += 1

    def poll(self) -> KVConnectorEvents:
        """Serve release messages and expire leases; the engine frees what comes back as `released`."""
        events = KVConnectorEvents()
        for _sender, raw in self.agent.receive():
            try:
                msg = decode_message(raw)
                if not isinstance(msg, ReleaseRequest):
                    raise ValueError(f"a holder expects ReleaseRequest, got {type(msg).__name__}")
                self.agent.add_peer_metadata(msg.reader, msg.reader_metadata_b64)
            except Exception as e:  # NOTE: NIXL raises its own errors for metadata it cannot load: never fatal
                log.warning("ignoring malformed KV notification %r: %s", raw[:80], e)
                self.counters["bad_messages"] += 1
                continue
            held = self.leases.pop(msg.request_id, None) is not None
            if held:
                events.released.append(msg.request_id)
            self.counters["released" if held else "release_after_free"] += 1
            err = self.agent.send(msg.reader, ReleaseAck(self.engine_id, msg.request_id, held).encode())
            if err:
                log.warning("could not acknowledge release of %s to %s: %s", msg.request_id, msg.reader, err)
        now = time.monotonic()
        for rid in [r for r, deadline in self.leases.items() if deadline < now]:
            del self.leases[rid]
            events.released.append(rid)
            self.counters["lease_expired"] += 1
            log.warning("KV of request %s held %.0f s with no reader: lease expired, blocks freed", rid,
                        self.cfg.held_kv_lease_s)
        return events

    def has_work(self) -> bool:
        return False  # holding blocks is not work: the instance's idle loop keeps polling for releases
