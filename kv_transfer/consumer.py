"""The decode role's KV connector: pulls the blocks of a prompt a prefill instance computed, exactly those the
local prefix cache lacks, and tells the engine when they are in place or when it must prefill locally instead
(kv_transfer/spec.py has the protocol). Every fallback is logged and counted (`fallbacks`, `fallback_<kind>`).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from engine.kv_connector import KVConnector, KVConnectorEvents, KVRanks, LoadDone, LoadFailed
from engine.request import Request
from kv_transfer.agent import TransferAgent
from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.errors import KVReleasedError, KVTransferError, TransferTimeoutError
from kv_transfer.handle import KVHandle
from kv_transfer.messages import ReleaseAck, ReleaseRequest, decode_message
from kv_transfer.read_state import ReadStatus

log = logging.getLogger(__name__)


class PullState(enum.Enum):
    READING = "reading"  # READs posted on every rank
    AWAITING_ACK = "awaiting_ack"  # read done (or nothing to read), release sent, waiting for held=True/False


@dataclass
class _Pull:
    handle: KVHandle
    xfer_id: str
    num_blocks: int  # blocks being read (the rest were cached here)
    state: PullState = PullState.READING
    deadline: float = 0.0  # of the ack, once AWAITING_ACK
    started: float = 0.0  # when its READs were posted (monotonic): `transfer_us` counts until they are done


class KVConsumer(KVConnector):
    def __init__(self, ranks: KVRanks, agent: TransferAgent, descriptors: list[AgentDescriptor], engine_id: str,
                 cfg: TransferConfig) -> None:
        self.ranks, self.agent, self.engine_id, self.cfg = ranks, agent, engine_id, cfg
        self.md_b64 = agent.partial_metadata_b64()
        self.pulls: dict[str, _Pull] = {}
        self.unsettled: dict[str, str] = {}  # request id -> xfer id of a read that may still write its old blocks
        self.by_holder: dict[tuple[str, str], str] = {}  # (prefill engine, its request id) -> our request id
        self.counters: Counter[str] = Counter()
        self._events = KVConnectorEvents()  # what the next poll reports
        self._seq = 0

    # ---- the engine's calls --------------------------------------------------------------------------------
    def start_load(self, request: Request, source: Any, num_cached_blocks: int) -> int:
        if not isinstance(source, KVHandle):
            raise ValueError(f"a KV source must be a KVHandle, not {type(source).__name__}")
        rid, n_blocks = request.request_id, len(request.block_ids)
        if source.num_tokens != request.num_prompt_tokens:
            raise ValueError(f"KV handle covers {source.num_tokens} tokens, the prompt has "
                             f"{request.num_prompt_tokens}")
        if len(source.block_ids) < n_blocks:
            raise ValueError(f"KV handle has {len(source.block_ids)} blocks, the prompt needs {n_blocks}")
        self.counters["blocks_cached_locally"] += num_cached_blocks
        self._seq += 1
        pull = _Pull(source, f"{self.engine_id}:{rid}:{self._seq}", n_blocks - num_cached_blocks,
                     started=time.monotonic())
        self.pulls[rid] = pull
        self.by_holder[(source.engine_id, source.request_id)] = rid
        if pull.num_blocks == 0:
            self._await_ack(rid, pull)  # nothing to read, but the holder must still free its copy
            return 0
        errors = [e for e in self.ranks.call(
            TransferAgent.start_read, pull.xfer_id, source.agents, request.block_ids[num_cached_blocks:],
            source.block_ids[num_cached_blocks:n_blocks]) if e is not None]
        if errors:
            self._fail(rid, errors[0])
        return pull.num_blocks

    def cancel_load(self, request_id: str) -> bool:
        self._events.failed = [f for f in self._events.failed if f.request_id != request_id]
        pull = self.pulls.get(request_id)
        if pull is not None:
            self._forget(request_id)
            self.counters["cancelled"] += 1
            if pull.state is PullState.READING:
                self._settle_or_quarantine(request_id, pull.xfer_id)
                self._send_release(pull)  # the holder may free its copy now
        return request_id not in self.unsettled

    def poll(self) -> KVConnectorEvents:
        if not self.pulls and not self.unsettled:  # NOTE: the decode step loop's common case: no NIXL call
            events, self._events = self._events, KVConnectorEvents()
            return events
        reading = {rid: p for rid, p in self.pulls.items() if p.state is PullState.READING}
        if reading:
            per_rank = self.ranks.call(TransferAgent.poll, [p.xfer_id for p in reading.values()])
            for rid, pull in reading.items():
                states = [r[pull.xfer_id] for r in per_rank]
                failed = next((s for s in states if s.status is ReadStatus.FAILED), None)
                if failed is not None:
                    assert failed.error is not None
                    self._fail(rid, failed.error)
                elif all(s.status is ReadStatus.DONE for s in states):
                    for stats in self.ranks.call(TransferAgent.finish, pull.xfer_id):
                        self.counters["bytes_transferred"] += stats.num_bytes
                        self.counters["descriptors"] += stats.num_descriptors
                    self.counters["transfer_us"] += int((time.monotonic() - pull.started) * 1e6)
                    self._await_ack(rid, pull)
        for _sender, raw in self.agent.receive():
            self._on_message(raw)
        now = time.monotonic()
        for rid, pull in list(self.pulls.items()):
            if pull.state is PullState.AWAITING_ACK and now > pull.deadline:
                self._fail(rid, TransferTimeoutError(f"no acknowledgement within {self.cfg.ack_timeout_s:g} s"))
        for rid, xfer_id in list(self.unsettled.items()):
            if self._settled(xfer_id):
                self.ranks.call(TransferAgent.finish, xfer_id)
                del self.unsettled[rid]
                self._events.settled.append(rid)
        events, self._events = self._events, KVConnectorEvents()
        return events

    def has_work(self) -> bool:
        return bool(self.pulls) or bool(self.unsettled)

    # ---- protocol steps ------------------------------------------------------------------------------------
    def _on_message(self, raw: bytes) -> None:
        try:
            msg = decode_message(raw)
            if not isinstance(msg, ReleaseAck):
                raise ValueError(f"a reader expects ReleaseAck, got {type(msg).__name__}")
        except ValueError as e:
            log.warning("ignoring malformed KV notification %r: %s", raw[:80], e)
            self.counters["bad_messages"] += 1
            return
        rid = self.by_holder.get((msg.engine_id, msg.request_id), "")
        pull = self.pulls.get(rid)
        if pull is None or pull.state is not PullState.AWAITING_ACK:
            return  # a late ack (the pull failed, timed out or was cancelled meanwhile)
        if msg.held:
            self._forget(rid)
            self.counters["transfers"] += 1
            self.counters["blocks_transferred"] += pull.num_blocks
            self._events.loaded.append(LoadDone(rid, pull.handle.first_token))
        else:
            self._fail(rid, KVReleasedError("the prefill worker had already freed the blocks"))

    def _await_ack(self, rid: str, pull: _Pull) -> None:
        pull.state = PullState.AWAITING_ACK
        pull.deadline = time.monotonic() + self.cfg.ack_timeout_s
        err = self._send_release(pull)
        if err:
            self._fail(rid, KVTransferError(f"could not send the release: {err}"))

    def _send_release(self, pull: _Pull) -> str | None:
        return self.agent.send(pull.handle.holder, ReleaseRequest(pull.handle.request_id, self.agent.name,
                                                                  self.md_b64).encode())

    def _forget(self, rid: str) -> _Pull:
        pull = self.pulls.pop(rid)
        self.by_holder.pop((pull.handle.engine_id, pull.handle.request_id), None)
        return pull

    def _fail(self, rid: str, error: KVTransferError) -> None:
        pull = self._forget(rid)
        settled = True
        if pull.state is PullState.READING:
            settled = self._settle_or_quarantine(rid, pull.xfer_id)
            self._send_release(pull)  # best effort: the holder may be the one that is gone
        self.counters[f"fallback_{error.kind}"] += 1
        self.counters["fallbacks"] += 1
        log.warning("KV pull for request %s failed (%s: %s); prefilling locally instead", rid,
                    type(error).__name__, error)
        self._events.failed.append(LoadFailed(rid, error, settled))

    def _settle_or_quarantine(self, rid: str, xfer_id: str) -> bool:
        """Release a read's handles if nothing of it is in flight; else remember it until it settles."""
        if self._settled(xfer_id):
            self.ranks.call(TransferAgent.finish, xfer_id)
            return True
        self.unsettled[rid] = xfer_id
        return False

    def _settled(self, xfer_id: str) -> bool:
        return all(self.ranks.call(TransferAgent.settled, xfer_id))
