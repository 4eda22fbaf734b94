"""The prefill role's KV connector: holds each finished request's blocks for a reader, under a lease, and
answers the reader's release (kv_transfer/spec.py has the protocol). A request queued with a reader to stream to
(`stream_to`) has its blocks and layer-group progress sent to that reader as its prompt is computed
(kv_transfer/stream.py); a reader that gives up on a stream before the prompt is done has the blocks freed as
soon as it is."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from engine.kv_connector import KVConnector, KVConnectorEvents, KVRanks, LayerHook
from engine.request import Request
from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.handle import KVHandle, KVReader
from kv_transfer.messages import ReleaseAck, ReleaseRequest, StreamBlocks, StreamProgress, decode_message
from kv_transfer.stream import LayerSignal, StreamNotifier

if TYPE_CHECKING:
    from engine.scheduler import SchedulerOutput
    from kv_transfer.agent import TransferAgent

log = logging.getLogger(__name__)


class KVProducer(KVConnector):
    def __init__(self, ranks: KVRanks, agent: TransferAgent, descriptors: list[AgentDescriptor], engine_id: str,
                 cfg: TransferConfig) -> None:
        self.agent, self.descriptors, self.engine_id, self.cfg = agent, descriptors, engine_id, cfg
        self.leases: dict[str, float] = {}  # request id -> deadline (monotonic) of its held blocks
        self.streams: dict[str, KVReader] = {}  # request id -> the reader its KV progress goes to, until finished
        self.abandoned: set[str] = set()  # streamed requests whose reader released them before they finished
        self.notifier: StreamNotifier | None = None  # made on the first stream
        self.counters: Counter[str] = Counter()

    def stream_to(self, request_id: str, reader: object) -> None:
        if not isinstance(reader, KVReader):
            raise ValueError(f"a KV reader must be a KVReader, not {type(reader).__name__}")
        if self.notifier is None:
            self.notifier = StreamNotifier(self.engine_id, self.agent.mem_type == "VRAM")
        self.streams[request_id] = reader
        self.counters["streams"] += 1

    def layer_hook(self, scheduled: SchedulerOutput) -> LayerHook | None:
        if not self.streams:
            return None
        targets: list[tuple[str, KVReader]] = []
        for request, n in zip(scheduled.requests, scheduled.num_scheduled_tokens, strict=True):
            reader = self.streams.get(request.request_id)
            if reader is not None and request.num_computed_tokens + n >= request.num_prompt_tokens:
                # NOTE: the prompt's last chunk: its blocks are final (it finishes in this step)
                targets.append((request.request_id, reader))
                self._send(reader, StreamBlocks(self.engine_id, request.request_id, list(request.block_ids),
                                                request.num_prompt_tokens).encode())
        if not targets:
            return None
        assert self.notifier is not None
        return LayerSignal(self.notifier, self.engine_id, targets, self.descriptors[0].num_layer_groups,
                           self.agent.mem_type == "VRAM")

    def request_finished(self, request: Request) -> KVHandle | None:
        rid = request.request_id
        reader = self.streams.pop(rid, None)
        if rid in self.abandoned:
            self.abandoned.discard(rid)
            return None  # NOTE: its reader gave up on it: nothing to hold, the engine frees the blocks now
        first_token = request.output_token_ids[0]
        if reader is not None:
            groups = self.descriptors[0].num_layer_groups
            self._send(reader, StreamProgress(self.engine_id, rid, groups, first_token, False).encode())
        self.leases[rid] = time.monotonic() + self.cfg.held_kv_lease_s
        return KVHandle(self.engine_id, rid, list(request.block_ids), request.num_prompt_tokens, first_token,
                        self.descriptors)

    def request_aborted(self, request_id: str) -> None:
        self.abandoned.discard(request_id)
        reader = self.streams.pop(request_id, None)
        if reader is not None:
            self.counters["streams_aborted"] += 1
            self._send(reader, StreamProgress(self.engine_id, request_id, 0, -1, True).encode())

    def drop_held(self, request_id: str) -> None:
        if self.leases.pop(request_id, None) is not None:
            self.counters["aborted_held"] += 1

    def _send(self, reader: KVReader, message: bytes) -> None:
        assert self.notifier is not None
        self.notifier.send(reader, message)

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
            elif self.streams.pop(msg.request_id, None) is not None:
                self.abandoned.add(msg.request_id)  # NOTE: released mid-stream: freed when its prompt is done
                self.counters["streams_abandoned"] += 1
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

    def close(self) -> None:
        if self.notifier is not None:
            self.notifier.close()
