"""The prefill role's KV connector: holds each finished request's blocks for a reader, under a lease, and
answers the reader's release (kv_transfer/spec.py has the protocol). A request queued with a reader to stream to
(`stream_to`) has its blocks and layer-group progress sent to that reader as its prompt is computed
(kv_transfer/stream.py); a reader that gives up on a stream before the prompt is done has the blocks freed as
soon as it is.

Releases are answered off the step loop: a reader waits for the answer (were the blocks still held, so is what it
read valid?) before its request decodes a second token, and from the step loop the answer would wait for the step
in flight (a whole prompt chunk). A thread of the producer's own is the only user of the holder's agent once
started: it polls it every RELEASE_POLL_S while blocks are held for a reader (every IDLE_POLL_S otherwise: a
release that abandons a stream can wait that long), answers each release at once, and hands the released
requests to the step loop, which frees their blocks at its next `poll`. Leases are still expired by the step
loop. NOTE: the acknowledgement may say "held" before the blocks are freed, never after: a lease is taken away
(by a release or by expiry) under one lock, and the engine frees blocks only when `poll` returns them."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from engine.kv_connector import KVConnector, KVConnectorEvents, KVRanks, LayerHook
from engine.request import Request
from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.handle import KVEndpoint, KVHandle, KVReader
from kv_transfer.messages import ReleaseAck, ReleaseRequest, StreamBlocks, StreamProgress, decode_message
from kv_transfer.stream import LayerSignal, StreamNotifier

if TYPE_CHECKING:
    from engine.scheduler import SchedulerOutput
    from kv_transfer.agent import TransferAgent

log = logging.getLogger(__name__)

RELEASE_POLL_S = 0.0005  # how often the release thread polls the agent while blocks are held for a reader
IDLE_POLL_S = 0.05  # ...and otherwise (releases of abandoned streams, malformed messages, connection set-up)


class KVProducer(KVConnector):
    def __init__(self, ranks: KVRanks, agent: TransferAgent, descriptors: list[AgentDescriptor], engine_id: str,
                 cfg: TransferConfig) -> None:
        self.agent, self.descriptors, self.engine_id, self.cfg = agent, descriptors, engine_id, cfg
        self.leases: dict[str, float] = {}  # request id -> deadline (monotonic) of its held blocks
        self.streams: dict[str, KVReader] = {}  # request id -> the reader its KV progress goes to, until finished
        self.abandoned: set[str] = set()  # streamed requests whose reader released them before they finished
        self.counters: Counter[str] = Counter()
        for name in ("released", "release_after_free", "streams_abandoned", "bad_messages", "ack_send_failures",
                     "meet_failures", "notify_connections"):
            self.counters[name] += 0  # NOTE: keys the release thread counts: inserted now, not while read elsewhere
        # NOTE: made now, not on the first stream: its NIXL agent and UCX worker take tens of ms to create (more
        # on a busy host), and on the first request that was the step loop's time, held by the first prompt
        self.notifier = StreamNotifier(self.engine_id, self.agent.mem_type == "VRAM", self.counters)
        self._lock = threading.Lock()  # leases, streams, abandoned, _released: the step loop and the release thread
        self._released: list[str] = []  # released by their readers since the last poll
        self._met: set[str] = set()  # readers introduced (meet), by agent name
        self._meet: queue.SimpleQueue[KVReader] = queue.SimpleQueue()  # for the release thread to learn
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._server = threading.Thread(target=self._serve_releases, name="kv-release-server", daemon=True)
        self._server.start()

    def meet(self, peers: list[Any]) -> int:
        """Ready sends to these readers (KVEndpoint) before any request needs them: the stream notifier loads
        each one's metadata and connects to it, and the release thread learns it (where its acknowledgements
        go), each on its own thread, off this (the step loop's) one. Counted: `peers_met`."""
        new = []
        for peer in peers:
            if not isinstance(peer, KVEndpoint):
                raise ValueError(f"a KV peer must be a KVEndpoint, not {type(peer).__name__}")
            if peer.engine_id != self.engine_id and peer.reader.agent_name not in self._met:
                self._met.add(peer.reader.agent_name)
                new.append(peer.reader)
        for reader in new:
            self.notifier.meet(reader)
            self._meet.put(reader)
        if new:
            self.counters["peers_met"] += len(new)
            self._wake.set()
        return len(new)

    def stream_to(self, request_id: str, reader: object) -> None:
        if not isinstance(reader, KVReader):
            raise ValueError(f"a KV reader must be a KVReader, not {type(reader).__name__}")
        with self._lock:
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
        return LayerSignal(self.notifier, self.engine_id, targets, self.descriptors[0].num_layer_groups,
                           self.agent.mem_type == "VRAM")

    def request_finished(self, request: Request) -> KVHandle | None:
        rid = request.request_id
        with self._lock:
            reader = self.streams.pop(rid, None)
            if rid in self.abandoned:
                self.abandoned.discard(rid)
                return None  # NOTE: its reader gave up on it: nothing to hold, the engine frees the blocks now
            # NOTE: the lease before the first token goes out: the reader's release may follow it at once
            self.leases[rid] = time.monotonic() + self.cfg.held_kv_lease_s
        self._wake.set()
        first_token = request.output_token_ids[0]
        if reader is not None:
            groups = self.descriptors[0].num_layer_groups
            self._send(reader, StreamProgress(self.engine_id, rid, groups, first_token, False).encode())
        return KVHandle(self.engine_id, rid, list(request.block_ids), request.num_prompt_tokens, first_token,
                        self.descriptors)

    def request_aborted(self, request_id: str) -> None:
        with self._lock:
            self.abandoned.discard(request_id)
            reader = self.streams.pop(request_id, None)
        if reader is not None:
            self.counters["streams_aborted"] += 1
            self._send(reader, StreamProgress(self.engine_id, request_id, 0, -1, True).encode())

    def drop_held(self, request_id: str) -> None:
        with self._lock:
            dropped = self.leases.pop(request_id, None) is not None
        if dropped:
            self.counters["aborted_held"] += 1

    def _send(self, reader: KVReader, message: bytes) -> None:
        self.notifier.send(reader, message)

    def poll(self) -> KVConnectorEvents:
        """What readers released since the last call (the release thread answered them), and expired leases; the
        engine frees both."""
        events = KVConnectorEvents()
        now = time.monotonic()
        with self._lock:
            events.released, self._released = self._released, []
            expired = [r for r, deadline in self.leases.items() if deadline < now]
            for rid in expired:
                del self.leases[rid]
        for rid in expired:
            events.released.append(rid)
            self.counters["lease_expired"] += 1
            log.warning("KV of request %s held %.0f s with no reader: lease expired, blocks freed", rid,
                        self.cfg.held_kv_lease_s)
        return events

    def _serve_releases(self) -> None:
        while not self._stop.is_set():
            if self.leases:  # NOTE: read without the lock: a stale answer costs one poll period
                time.sleep(RELEASE_POLL_S)
            elif self._wake.wait(IDLE_POLL_S):
                self._wake.clear()
            self._learn_readers()
            try:
                messages = self.agent.receive()
            except Exception as e:  # NOTE: never end the thread: the readers time out and fall back
                self.counters["receive_failures"] += 1
                log.warning("KV holder %s: receiving notifications failed: %s: %s", self.engine_id,
                            type(e).__name__, e)
                time.sleep(IDLE_POLL_S)
                continue
            for _sender, raw in messages:
                self._release(raw)

    def _learn_readers(self) -> None:
        """The readers `meet` introduced: their metadata and a connection, so that an acknowledgement to one needs
        no load and no connection set-up (`notify_connections`)."""
        while True:
            try:
                reader = self._meet.get_nowait()
            except queue.Empty:
                return
            try:
                if self.agent.add_peer_metadata(reader.agent_name, reader.metadata_b64, connect=True):
                    self.counters["notify_connections"] += 1
            except Exception as e:  # NOTE: the reader's release carries its metadata again
                self.counters["meet_failures"] += 1
                log.warning("could not load the metadata of reader %s: %s: %s", reader.agent_name,
                            type(e).__name__, e)

    def _release(self, raw: bytes) -> None:
        """Answer one reader's release (on the release thread)."""
        try:
            msg = decode_message(raw)
            if not isinstance(msg, ReleaseRequest):
                raise ValueError(f"a holder expects ReleaseRequest, got {type(msg).__name__}")
            self.agent.add_peer_metadata(msg.reader, msg.reader_metadata_b64)
        except Exception as e:  # NOTE: NIXL raises its own errors for metadata it cannot load: never fatal
            log.warning("ignoring malformed KV notification %r: %s", raw[:80], e)
            self.counters["bad_messages"] += 1
            return
        with self._lock:
            held = self.leases.pop(msg.request_id, None) is not None
            if held:
                self._released.append(msg.request_id)
            elif self.streams.pop(msg.request_id, None) is not None:
                self.abandoned.add(msg.request_id)  # NOTE: released mid-stream: freed when its prompt is done
                self.counters["streams_abandoned"] += 1
        self.counters["released" if held else "release_after_free"] += 1
        err = self.agent.send(msg.reader, ReleaseAck(self.engine_id, msg.request_id, held).encode())
        if err:
            self.counters["ack_send_failures"] += 1
            log.warning("could not acknowledge release of %s to %s: %s", msg.request_id, msg.reader, err)

    def has_work(self) -> bool:
        return False  # holding blocks is not work: the instance's idle loop keeps polling for releases

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._server.join(timeout=10)
        self.notifier.close()
