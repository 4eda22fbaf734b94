"""The decode role's KV connector: pulls the blocks of a prompt a prefill instance computed, exactly those the
local prefix cache lacks, and tells the engine when they are in place or when it must prefill locally instead
(kv_transfer/spec.py has the protocol). Every fallback is logged and counted (`fallbacks`, `fallback_<kind>`).

A source is a finished prefill (KVHandle: every layer group is read at once) or one still running (StreamedKV:
the holder names its blocks when the prompt's last chunk is scheduled and announces each layer group as it is
written; each newly announced span of groups is read at once, while the later layers compute).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.kv_connector import KVConnector, KVConnectorEvents, KVRanks, LoadDone, LoadFailed
from engine.request import Request
from kv_transfer.agent import TransferAgent
from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.errors import KVReleasedError, KVTransferError, PeerGoneError, TransferTimeoutError
from kv_transfer.handle import KVEndpoint, KVHandle, KVReader, StreamedKV
from kv_transfer.messages import ReleaseRequest, StreamBlocks, StreamProgress, decode_message
from kv_transfer.read_state import ReadStatus

log = logging.getLogger(__name__)

EARLY_KEEP_S = 120.0  # how long stream messages for a request not (yet) loading here are kept
FLUSH_S = 2.0  # how long the agent keeps progressing after a release was sent (a send completes only then)


class PullState(enum.Enum):
    READING = "reading"  # waiting for the holder's progress and/or READs in flight
    AWAITING_ACK = "awaiting_ack"  # every group read (or nothing to read), release sent, waiting for held=True/False


@dataclass
class _Pull:
    source: KVHandle | StreamedKV
    xfer_id: str  # its reads are f"{xfer_id}:{first group}"
    local_blocks: list[int]  # the blocks to fill here (those before were cached here)
    first: int  # index in the prompt's blocks of local_blocks[0]
    remote_blocks: list[int] | None  # the holder's blocks of the whole prompt; None until a streaming holder names them
    num_groups: int  # the layout's layer groups
    groups_done: int  # layer groups the holder has written
    first_token: int  # -1 until the holder sampled it
    deadline: float  # AWAITING_ACK: of the ack; READING a stream: of the holder's next message
    started: float  # when the pull started (monotonic): `transfer_us` counts until the last read is done
    state: PullState = PullState.READING
    posted: int = 0  # layer groups whose reads are posted
    reads: list[str] = field(default_factory=list)  # reads in flight
    tail_from: float = 0.0  # a stream: when the first token (the last group's news) came (monotonic)
    ack_from: float = 0.0  # when the release was sent

    @property
    def num_blocks(self) -> int:
        return len(self.local_blocks)


class KVConsumer(KVConnector):
    def __init__(self, ranks: KVRanks, agent: TransferAgent, descriptors: list[AgentDescriptor], engine_id: str,
                 cfg: TransferConfig) -> None:
        self.ranks, self.agent, self.engine_id, self.cfg = ranks, agent, engine_id, cfg
        self.md_b64 = agent.partial_metadata_b64()
        self.reader = KVReader(agent.name, self.md_b64)  # what a streaming holder is told to send to
        self.pulls: dict[str, _Pull] = {}
        self.unsettled: dict[str, list[str]] = {}  # request id -> reads that may still write its old blocks
        self.by_holder: dict[tuple[str, str], str] = {}  # (prefill engine, its request id) -> our request id
        # stream messages for a (prefill engine, request id) not loading here yet: (first seen, messages)
        self.early: dict[tuple[str, str], tuple[float, list[StreamBlocks | StreamProgress]]] = {}
        self.counters: Counter[str] = Counter()
        self._events = KVConnectorEvents()  # what the next poll reports
        self._seq = 0
        self._flush_until = 0.0  # monotonic: progress the agent until then (a release in flight)

    # ---- the engine's calls --------------------------------------------------------------------------------
    def start_load(self, request: Request, source: Any, num_cached_blocks: int) -> int:
        if not isinstance(source, KVHandle | StreamedKV):
            raise ValueError(f"a KV source must be a KVHandle or StreamedKV, not {type(source).__name__}")
        rid, n_blocks = request.request_id, len(request.block_ids)
        if source.num_tokens != request.num_prompt_tokens:
            raise ValueError(f"KV source covers {source.num_tokens} tokens, the prompt has "
                             f"{request.num_prompt_tokens}")
        if not source.agents:
            raise ValueError("KV source names no agents")
        streamed = isinstance(source, StreamedKV)
        if not streamed and len(source.block_ids) < n_blocks:
            raise ValueError(f"KV handle has {len(source.block_ids)} blocks, the prompt needs {n_blocks}")
        self.counters["blocks_cached_locally"] += num_cached_blocks
        self._seq += 1
        groups = source.agents[0].num_layer_groups
        now = time.monotonic()
        pull = _Pull(source, f"{self.engine_id}:{rid}:{self._seq}", request.block_ids[num_cached_blocks:],
                     num_cached_blocks, None if streamed else list(source.block_ids), groups,
                     0 if streamed else groups, -1 if streamed else source.first_token,
                     now + self.cfg.stream_timeout_s, now)
        self.pulls[rid] = pull
        key = (source.engine_id, source.request_id)
        self.by_holder[key] = rid
        if not streamed:
            self._events.first_tokens.append(LoadDone(rid, source.first_token))
        # NOTE: the release goes to the holder's rank-0 agent, which no read may have met (a stream given up before
        # its blocks came, or reads by local copy)
        self.agent.know(source.agents[0])
        if streamed:
            self.counters["streamed"] += 1
            for msg in self.early.pop(key, (0.0, []))[1]:
                self._on_stream(rid, pull, msg)
        if rid in self.pulls:
            self._advance(rid, pull)
        return pull.num_blocks

    def cancel_load(self, request_id: str) -> bool:
        self._events.failed = [f for f in self._events.failed if f.request_id != request_id]
        self._events.first_tokens = [f for f in self._events.first_tokens if f.request_id != request_id]
        pull = self.pulls.get(request_id)
        if pull is not None:
            self._forget(request_id)
            self.counters["cancelled"] += 1
            if pull.state is PullState.READING:
                self._settle_or_quarantine(request_id, pull.reads)
                self._send_release(pull)  # the holder may free its copy now (or drop the stream)
                self._flush_until = time.monotonic() + FLUSH_S  # NOTE: no ack is awaited: progress the send
        return request_id not in self.unsettled

    def meet(self, peers: list[Any]) -> int:
        """Ready reads from these holders (KVEndpoint) before any request needs them: every rank maps or
        connects to the holder's agents it would read from (TransferAgent.meet), and rank 0 learns the holder's
        rank-0 agent, where releases go. Counted: `peers_met`, `meet_failures`."""
        new = 0
        for peer in peers:
            if not isinstance(peer, KVEndpoint) or not peer.agents:
                raise ValueError(f"a KV peer must be a KVEndpoint with agents, not {peer!r}")
            if peer.engine_id == self.engine_id:
                continue
            met = self.ranks.call(TransferAgent.meet, peer.agents)
            self.counters["meet_failures"] += sum(m.failed for m in met)
            try:
                if self.agent.know(peer.agents[0], connect=True):
                    self.counters["notify_connections"] += 1
            except Exception as e:  # NOTE: start_load tries again and fails the request if it must
                self.counters["meet_failures"] += 1
                log.warning("could not load the metadata of %s: %s: %s", peer.agents[0].agent_name,
                            type(e).__name__, e)
            if any(m.new for m in met):
                new += 1
                self.counters["peers_met"] += 1
        if new:
            self._flush_until = time.monotonic() + FLUSH_S  # NOTE: a connection completes while the agent progresses
        return new

    def source_ready(self, request_id: str, source: Any) -> None:
        pull = self.pulls.get(request_id)
        if (pull is None or not isinstance(source, KVHandle) or not isinstance(pull.source, StreamedKV)
                or pull.first_token >= 0 or pull.state is not PullState.READING
                or (source.engine_id, source.request_id) != (pull.source.engine_id, pull.source.request_id)):
            return  # NOTE: the common case: the holder's own messages came first
        # NOTE: its prefill is done and held, but the holder's last messages have not come (a notification can
        # lag, e.g. while a new connection is set up under load): the hand-off says the same, so go on with it
        self.counters["streams_completed_by_handle"] += 1
        log.info("request %s: its prefill finished before the stream's last messages came; reading by its hand-off",
                 request_id)
        if pull.remote_blocks is None:
            self._on_stream(request_id, pull, StreamBlocks(source.engine_id, source.request_id, source.block_ids,
                                                           source.num_tokens))
        if request_id in self.pulls:
            self._on_stream(request_id, pull, StreamProgress(source.engine_id, source.request_id, pull.num_groups,
                                                             source.first_token, False))
            self._advance(request_id, pull)

    def source_lost(self, request_id: str) -> None:
        if request_id in self.pulls:
            self._fail(request_id, PeerGoneError("its prefill instance failed (reported by the router)"))
            return
        # NOTE: its pull ended already (the stream brought everything before the prefill call failed), or, were
        # the router's calls to reach this instance out of order, has not started: said, so a slow request shows it
        self.counters["source_lost_without_pull"] += 1
        log.info("request %s: its prefill failed (reported by the router) with no KV pull of it here", request_id)

    def poll(self) -> KVConnectorEvents:
        if not self.pulls and not self.unsettled and not self.early and time.monotonic() > self._flush_until:
            # NOTE: the decode loop's common case: no NIXL call
            events, self._events = self._events, KVConnectorEvents()
            return events
        reading = [xid for p in self.pulls.values() for xid in p.reads]
        if reading:
            per_rank = self.ranks.call(TransferAgent.poll, reading)
            for rid, pull in list(self.pulls.items()):
                self._collect(rid, pull, per_rank)
        for _sender, raw in self.agent.receive():
            self._on_message(raw)
        now = time.monotonic()
        for rid, pull in list(self.pulls.items()):
            if now <= pull.deadline:
                continue
            if pull.state is PullState.AWAITING_ACK:
                self._fail(rid, TransferTimeoutError(f"no acknowledgement within {self.cfg.ack_timeout_s:g} s"))
            elif not pull.reads and pull.first_token < 0:
                self._fail(rid, TransferTimeoutError(
                    f"no progress from the prefill instance within {self.cfg.stream_timeout_s:g} s"))
        for rid, xfer_ids in list(self.unsettled.items()):
            if self._settled(xfer_ids):
                for xid in xfer_ids:
                    self.ranks.call(TransferAgent.finish, xid)
                del self.unsettled[rid]
                self._events.settled.append(rid)
        for key in [k for k, (seen, _) in self.early.items() if now - seen > EARLY_KEEP_S]:
            del self.early[key]  # NOTE: late messages of a pull that ended (cancelled, failed): nothing to do
        events, self._events = self._events, KVConnectorEvents()
        return events

    def has_work(self) -> bool:
        return bool(self.pulls) or bool(self.unsettled) or time.monotonic() <= self._flush_until

    # ---- protocol steps ------------------------------------------------------------------------------------
    def _collect(self, rid: str, pull: _Pull, per_rank: list[dict[str, Any]]) -> None:
        """Finish the pull's reads that are done on every rank; fail it if one failed."""
        for xid in list(pull.reads):
            states = [r[xid] for r in per_rank]
            failed = next((s for s in states if s.status is ReadStatus.FAILED), None)
            if failed is not None:
                assert failed.error is not None
                self._fail(rid, failed.error)
                return
            if all(s.status is ReadStatus.DONE for s in states):
                for stats in self.ranks.call(TransferAgent.finish, xid):
                    self.counters["bytes_transferred"] += stats.num_bytes
                    self.counters["descriptors"] += stats.num_descriptors
                    self.counters["local_copy_bytes"] += stats.local_bytes
                    self.counters["local_copy_fallbacks"] += stats.local_copy_fallbacks
                pull.reads.remove(xid)
        self._advance(rid, pull)

    def _advance(self, rid: str, pull: _Pull) -> None:
        """Post reads of the groups the holder has written since the last ones; once every group is read and the
        first token is known, ask the holder to release its copy."""
        if pull.state is not PullState.READING or pull.remote_blocks is None:
            return
        if pull.posted < pull.groups_done and pull.num_blocks:
            if pull.posted == 0:
                pull.started = time.monotonic()  # NOTE: `transfer_us` counts from the first read's posting
            xid = f"{pull.xfer_id}:{pull.posted}"
            remote = pull.remote_blocks[pull.first:pull.first + pull.num_blocks]
            errors = [e for e in self.ranks.call(TransferAgent.start_read, xid, pull.source.agents,
                                                 pull.local_blocks, remote, range(pull.posted, pull.groups_done))
                      if e is not None]
            pull.reads.append(xid)
            if errors:
                self._fail(rid, errors[0])
                return
        pull.posted = pull.groups_done
        if pull.posted == pull.num_groups and not pull.reads and pull.first_token >= 0:
            now = time.monotonic()
            self.counters["transfer_us"] += int((now - pull.started) * 1e6)
            if pull.tail_from:  # NOTE: what streaming leaves after the prefill: the last group's read
                self.counters["stream_tail_us"] += int((now - pull.tail_from) * 1e6)
            self._await_ack(rid, pull)

    def _on_message(self, raw: bytes) -> None:
        try:
            msg = decode_message(raw)
            if isinstance(msg, ReleaseRequest):
                raise ValueError("a reader does not serve ReleaseRequest")
        except ValueError as e:
            log.warning("ignoring malformed KV notification %r: %s", raw[:80], e)
            self.counters["bad_messages"] += 1
            return
        key = (msg.engine_id, msg.request_id)
        rid = self.by_holder.get(key, "")
        pull = self.pulls.get(rid)
        if isinstance(msg, StreamBlocks | StreamProgress):
            if pull is None:
                _, msgs = self.early.setdefault(key, (time.monotonic(), []))
                msgs.append(msg)
            else:
                self._on_stream(rid, pull, msg)
                if rid in self.pulls:
                    self._advance(rid, pull)
            return
        if pull is None or pull.state is not PullState.AWAITING_ACK:
            return  # a late ack (the pull failed, timed out or was cancelled meanwhile)
        if msg.held:
            self._forget(rid)
            self.counters["ack_wait_us"] += int((time.monotonic() - pull.ack_from) * 1e6)
            self.counters["transfers"] += 1
            self.counters["blocks_transferred"] += pull.num_blocks
            self._events.loaded.append(LoadDone(rid, pull.first_token))
        else:
            self._fail(rid, KVReleasedError("the prefill worker had already freed the blocks"))

    def _on_stream(self, rid: str, pull: _Pull, msg: StreamBlocks | StreamProgress) -> None:
        """A streaming holder's news: its blocks, or how many layer groups are written."""
        pull.deadline = time.monotonic() + self.cfg.stream_timeout_s
        if isinstance(msg, StreamBlocks):
            holder = pull.source.agents[0]
            need = pull.first + pull.num_blocks
            if msg.num_tokens != pull.source.num_tokens or len(msg.block_ids) < need or any(
                    b >= holder.num_blocks for b in msg.block_ids):
                self._fail(rid, KVTransferError(f"the holder's blocks ({len(msg.block_ids)} for {msg.num_tokens} "
                                                f"tokens) do not fit this prompt ({need} blocks)"))
                return
            pull.remote_blocks = list(msg.block_ids)
            return
        if msg.aborted:
            self._fail(rid, KVReleasedError("the prefill instance dropped the request"))
            return
        if not 0 <= msg.groups_done <= pull.num_groups or (msg.first_token >= 0) != (
                msg.groups_done == pull.num_groups):
            self._fail(rid, KVTransferError(f"bad stream progress {msg.groups_done}/{pull.num_groups} groups"))
            return
        pull.groups_done = max(pull.groups_done, msg.groups_done)
        if msg.first_token >= 0 and pull.first_token < 0:
            pull.first_token, pull.tail_from = msg.first_token, time.monotonic()
            self._events.first_tokens.append(LoadDone(rid, msg.first_token))
        self.counters["stream_messages"] += 1

    def _await_ack(self, rid: str, pull: _Pull) -> None:
        pull.state = PullState.AWAITING_ACK
        pull.ack_from = time.monotonic()
        pull.deadline = pull.ack_from + self.cfg.ack_timeout_s
        err = self._send_release(pull)
        if err:
            self._fail(rid, KVTransferError(f"could not send the release: {err}"))

    def _send_release(self, pull: _Pull) -> str | None:
        err = self.agent.send(pull.source.holder, ReleaseRequest(pull.source.request_id, self.agent.name,
                                                                 self.md_b64).encode())
        if err:
            self.counters["release_send_failures"] += 1
            log.warning("could not send the release of %s to %s: %s", pull.source.request_id, pull.source.holder,
                        err)
        return err

    def _forget(self, rid: str) -> _Pull:
        pull = self.pulls.pop(rid)
        self.by_holder.pop((pull.source.engine_id, pull.source.request_id), None)
        return pull

    def _fail(self, rid: str, error: KVTransferError) -> None:
        pull = self._forget(rid)
        settled = True
        if pull.state is PullState.READING:
            settled = self._settle_or_quarantine(rid, pull.reads)
            self._send_release(pull)  # best effort: the holder may be the one that is gone
            self._flush_until = time.monotonic() + FLUSH_S
        self.counters[f"fallback_{error.kind}"] += 1
        self.counters["fallbacks"] += 1
        log.warning("KV pull for request %s failed (%s: %s); prefilling locally instead", rid,
                    type(error).__name__, error)
        self._events.failed.append(LoadFailed(rid, error, settled))

    def _settle_or_quarantine(self, rid: str, xfer_ids: list[str]) -> bool:
        """Release reads' handles if nothing of them is in flight; else remember them until they settle."""
        if self._settled(xfer_ids):
            for xid in xfer_ids:
                self.ranks.call(TransferAgent.finish, xid)
            return True
        self.unsettled[rid] = list(xfer_ids)
        return False

    def _settled(self, xfer_ids: list[str]) -> bool:
        return all(all(self.ranks.call(TransferAgent.settled, xid)) for xid in xfer_ids)
