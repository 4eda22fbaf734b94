"""Layer-wise KV streaming, the prefill side: tell a reader which layer groups of a prompt's KV are written while
the forward still runs, so it reads them behind the later layers' compute (issue 20).

    step scheduled, prompt's last chunk in it  ─►  StreamBlocks(blocks)                 (KVProducer.layer_hook)
    forward issued layer group g (g < G - 1)   ─►  StreamProgress(g + 1 groups done)    (LayerSignal, per group)
    first token sampled                        ─►  StreamProgress(G, first token)       (KVProducer.request_finished)

Every stream message goes through one `StreamNotifier`: a thread with a NIXL agent of its own (so no agent is used
from two threads) that sends them in order. On a GPU the forward is only issued when the hook runs, so each group
message waits, on that thread, for a CUDA event recorded after the group's layers: the step loop never blocks on
it, and the group's KV is complete on every TP rank by then (each layer ends in an all-reduce over the ranks).
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer.handle import KVReader
from kv_transfer.messages import StreamProgress
from kv_transfer.transports import quiet_stdout

log = logging.getLogger(__name__)

PROGRESS_PERIOD_S = 0.0002  # without NIXL's progress thread: how often the agent is progressed right after a send,
IDLE_PROGRESS_S = 0.05  # backing off to this (a connection's set-up and a send under load may need seconds of it)


@dataclass(frozen=True)
class _Send:
    reader: KVReader
    message: bytes
    after: Any = None  # a torch.cuda.Event the message waits for, or None


@dataclass(frozen=True)
class _Meet:
    reader: KVReader


class StreamNotifier:
    def __init__(self, engine_id: str, progress_thread: bool, counters: Counter[str] | None = None) -> None:
        """`progress_thread`: NIXL's (a GPU worker: cores to spare); without it this thread progresses the agent
        itself for a while after each send (it would spin a core for good: kv_transfer/agent.py). `counters`:
        where it counts messages sent and sends that failed (its owner's, published with its heartbeats)."""
        from nixl._api import nixl_agent, nixl_agent_config

        self.progress_thread = progress_thread
        with quiet_stdout():
            self.agent = nixl_agent(f"{engine_id}-stream-{os.getpid()}", nixl_agent_config(
                enable_prog_thread=progress_thread, backends=["UCX"]))
        self.counters: Counter[str] = Counter() if counters is None else counters
        for name in ("stream_messages_sent", "stream_send_failures", "meet_failures"):
            self.counters[name] += 0  # NOTE: no key inserted later, while another thread may copy the counter
        self._peers: dict[str, str] = {}
        self._queue: queue.SimpleQueue[_Send | _Meet | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kv-stream-notifier", daemon=True)
        self._thread.start()

    def send(self, reader: KVReader, message: bytes, after: Any = None) -> None:
        self._queue.put(_Send(reader, message, after))

    def meet(self, reader: KVReader) -> None:
        """Load the reader's metadata and connect to it now, before the first message to it."""
        self._queue.put(_Meet(reader))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        period: float | None = None  # None: nothing to progress, wait for the next message
        while True:
            # NOTE: a send completes (and a new peer's connection is set up) only while the sender's UCX worker
            # progresses. Without NIXL's progress thread (it would spin a core for good), this thread progresses
            # the agent itself: often right after a send, then backing off, and never stopping for good (under
            # load a send can take far longer than the first few polls; a message left unsent would leave its
            # reader waiting for kv_transfer.stream_timeout_s).
            try:
                item = self._queue.get(timeout=period) if period else self._queue.get()
            except queue.Empty:
                self.agent.get_new_notifs()  # progresses the worker
                period = min(2 * (period or PROGRESS_PERIOD_S), IDLE_PROGRESS_S)
                continue
            if item is None:
                return
            period = None if self.progress_thread else PROGRESS_PERIOD_S
            if isinstance(item, _Meet):
                self._meet(item.reader)
                continue
            try:
                if item.after is not None:
                    item.after.synchronize()
                self.agent.send_notif(self._peer(item.reader), item.message)
                self.counters["stream_messages_sent"] += 1
            except Exception as e:  # NOTE: the reader times out or is told by its router; this side goes on
                self.counters["stream_send_failures"] += 1
                log.warning("could not send a KV stream message to %s: %s: %s", item.reader.agent_name,
                            type(e).__name__, e)

    def _peer(self, reader: KVReader) -> str:
        peer = self._peers.get(reader.agent_name)
        if peer is None:
            raw = self.agent.add_remote_agent(base64.b64decode(reader.metadata_b64))
            peer = self._peers[reader.agent_name] = raw.decode() if isinstance(raw, bytes) else str(raw)
        return peer

    def _meet(self, reader: KVReader) -> None:
        if reader.agent_name in self._peers:
            return
        try:
            self.agent.make_connection(self._peer(reader))
        except Exception as e:  # NOTE: the first message tries again (and counts a failed send if it must)
            self.counters["meet_failures"] += 1
            log.warning("could not connect to KV reader %s ahead of its first message: %s: %s", reader.agent_name,
                        type(e).__name__, e)


class LayerSignal:
    """The forward's layer hook for one step (engine.kv_connector.LayerHook): after layer group g, tell every
    streamed request completing its prompt in this step that groups [0, g + 1) are written. The last group is not
    announced here: the first token, sampled after it, announces it."""

    def __init__(self, notifier: StreamNotifier, engine_id: str, targets: list[tuple[str, KVReader]],
                 num_groups: int, cuda: bool) -> None:
        self.notifier, self.engine_id, self.targets = notifier, engine_id, targets
        self.num_groups, self.cuda = num_groups, cuda

    def __call__(self, group: int) -> None:
        if group + 1 >= self.num_groups:
            return
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        for request_id, reader in self.targets:
            self.notifier.send(reader, StreamProgress(self.engine_id, request_id, group + 1, -1, False).encode(),
                               event)
