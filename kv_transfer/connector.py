"""Engine integration of the pull protocol.

    prefill (KVProducer)                                 decode (KVConsumer)
    add_request(hold_kv) -> step() ... -> KVHandle  ───► add_remote_request(prompt, params, handle)
      blocks held under a lease                            reserve blocks (prefix-cache hits skipped)
                                                           one READ per (decode rank, prefill rank)
                                                           for exactly the missing blocks, coalesced
                    ◄──────── "release" (notification) ──  when every rank's READ is DONE
      free the blocks; answer held=true/false ─────────►   held -> commit: prompt computed, first token out
                                                           not held / error / timeout -> fallback to local
                                                           prefill (logged and counted)

The holder answers `held=false` when it had already freed the blocks (lease expiry, abort): whatever was read
may have been overwritten, so the reader never commits it. A lease frees blocks no reader comes for.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.agent import TransferAgent
from kv_transfer.config import TransferConfig
from kv_transfer.errors import KVReleasedError, KVTransferError, PeerGoneError, TransferTimeoutError
from kv_transfer.handle import KVHandle

log = logging.getLogger(__name__)


def _attach(engine: LLMEngine, engine_id: str, cfg: TransferConfig) -> tuple[list[dict[str, Any]], TransferAgent]:
    descs = engine.executor.collective_rpc("attach", "kv", TransferAgent.for_worker, engine_id, cfg)
    return descs, engine.executor.worker.extensions["kv"]


class KVProducer:
    """Prefill role: runs prompts to their first token and holds their KV for a reader."""

    def __init__(self, engine: LLMEngine, engine_id: str, cfg: TransferConfig | None = None) -> None:
        self.engine = engine
        self.engine_id = engine_id
        self.cfg = cfg or TransferConfig()
        self.agents, self.agent = _attach(engine, engine_id, self.cfg)
        self.leases: dict[str, float] = {}  # request id -> deadline (monotonic)
        self.counters: Counter[str] = Counter()

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        one = SamplingParams(**{**vars(params), "max_tokens": 1})
        self.engine.add_request(request_id, prompt, one, hold_kv=True)

    def step(self) -> list[tuple[RequestOutput, KVHandle | None]]:
        """Advance prefill; returns finished outputs with their handle (None if aborted)."""
        results: list[tuple[RequestOutput, KVHandle | None]] = []
        for out in self.engine.step() if self.engine.has_unfinished_requests() else []:
            if not out.finished:
                continue
            handle = None
            if out.kv_block_ids is not None:
                self.leases[out.request_id] = time.monotonic() + self.cfg.lease_s
                handle = KVHandle(self.engine_id, out.request_id, out.kv_block_ids, len(out.prompt_token_ids),
                                  out.token_ids[0], self.agents, finished=out.finish_reason == "stop")
            results.append((out, handle))
        self.poll()
        return results

    def poll(self) -> None:
        """Serve release messages and expire leases; call regularly even when idle."""
        for _sender, raw in self.agent.receive():
            try:
                msg = json.loads(raw)
                rid, peer = str(msg["req"]), str(msg["from"])
                self.agent.add_peer_metadata(peer, str(msg["md"]))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring malformed KV notification %r: %s", raw[:80], e)
                self.counters["bad_messages"] += 1
                continue
            held = self.leases.pop(rid, None) is not None and self.engine.release_held(rid)
            self.counters["released" if held else "release_after_free"] += 1
            ack = {"op": "ack", "engine": self.engine_id, "req": rid, "held": held}
            err = self.agent.send(peer, json.dumps(ack).encode())
            if err:
                log.warning("could not acknowledge release of %s to %s: %s", rid, peer, err)
        now = time.monotonic()
        for rid in [r for r, deadline in self.leases.items() if deadline < now]:
            del self.leases[rid]
            self.engine.release_held(rid)
            self.counters["lease_expired"] += 1
            log.warning("KV of request %s held %.0f s with no reader: lease expired, blocks freed", rid,
                        self.cfg.lease_s)

    def abort(self, request_id: str) -> None:
        """Abort in any state: queued/running (engine abort) or finished and held (blocks freed now)."""
        if self.leases.pop(request_id, None) is not None:
            self.counters["aborted_held"] += 1
        self.engine.abort_request(request_id)


@dataclass
class _Pull:
    handle: KVHandle
    xfer_id: str
    num_blocks: int
    state: str = "reading"  # reading -> awaiting_ack -> (committed | fallback)
    deadline: float = 0.0
    aborted: bool = False
    started: float = field(default_factory=time.monotonic)


class KVConsumer:
    """Decode role: pulls the missing KV of prefilled requests and decodes them; falls back to local prefill
    (logged and counted) on any transfer failure."""

    def __init__(self, engine: LLMEngine, engine_id: str, cfg: TransferConfig | None = None) -> None:
        self.engine = engine
        self.engine_id = engine_id
        self.cfg = cfg or TransferConfig()
        self.agents, self.agent = _attach(engine, engine_id, self.cfg)
        self.md_b64 = self.agent.partial_metadata_b64()
        self.pulls: dict[str, _Pull] = {}
        self.counters: Counter[str] = Counter()
        self.errors: dict[str, KVTransferError] = {}  # request id -> why its pull failed
        self.unsettled: dict[str, str] = {}  # request id -> failed read still in flight into quarantined blocks
        self.by_holder: dict[tuple[str, str], str] = {}  # (prefill engine, its request id) -> our request id
        self._seq = 0

    # ---- intake --------------------------------------------------------------------------------------------
    def add_remote_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                           handle: KVHandle) -> int:
        """Reserve blocks and start pulling what the local prefix cache lacks. Returns the number of blocks
        being transferred (0: everything was cached here, or the first token already finished it)."""
        if handle.num_tokens != len(prompt):
            raise ValueError(f"KV handle covers {handle.num_tokens} tokens, the prompt has {len(prompt)}")
        block_ids, n_hit = self.engine.reserve_remote(request_id, prompt, params)
        n_blocks = len(block_ids)
        if len(handle.block_ids) < n_blocks:
            self.engine.fallback_local(request_id)
            raise ValueError(f"KV handle has {len(handle.block_ids)} blocks, the prompt needs {n_blocks}")
        self.counters["blocks_cached_locally"] += n_hit
        self._seq += 1
        pull = _Pull(handle, f"{self.engine_id}:{request_id}:{self._seq}", n_blocks - n_hit)
        self.pulls[request_id] = pull
        self.by_holder[(handle.engine_id, handle.request_id)] = request_id
        if pull.num_blocks == 0:
            self._release_remote(pull)  # nothing to read, but the holder must still free its copy
            return 0
        errors = [e for e in self.engine.executor.collective_rpc(
            "call", "kv", "start_read", pull.xfer_id, handle.agents, block_ids[n_hit:n_blocks],
            handle.block_ids[n_hit:n_blocks]) if e]
        if errors:
            self._fail(request_id, errors[0])
        return pull.num_blocks

    def abort(self, request_id: str) -> None:
        """Abort in any state. A read in flight is left to settle first; its blocks are freed after."""
        pull = self.pulls.get(request_id)
        if pull is None:
            self.engine.abort_request(request_id)
            return
        pull.aborted = True
        if pull.state == "awaiting_ack":
            self.engine.abort_request(request_id)

    # ---- progress ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.pulls or self.unsettled:
            self._advance()
        return self.engine.step() if self.engine.has_unfinished_requests() else []

    def has_work(self) -> bool:
        return bool(self.pulls) or self.engine.has_unfinished_requests() or bool(self.unsettled)

    def _advance(self) -> None:
        reading = {rid: p for rid, p in self.pulls.items() if p.state == "reading"}
        if reading:
            per_rank = self.engine.executor.collective_rpc("call", "kv", "poll", [p.xfer_id for p in
                                                                                  reading.values()])
            for rid, pull in reading.items():
                states = [r[pull.xfer_id] for r in per_rank]
                err = next((s for s in states if s.startswith("ERR")), None)
                if err:
                    self._fail(rid, err)
                elif all(s == "DONE" for s in states):
                    stats = self.engine.executor.collective_rpc("call", "kv", "finish", pull.xfer_id)
                    self.counters["bytes_transferred"] += int(sum(s.get("bytes", 0) for s in stats))
                    self.counters["descriptors"] += int(sum(s.get("descs", 0) for s in stats))
                    self._release_remote(pull)
        for _sender, raw in self.agent.receive():
            try:
                msg = json.loads(raw)
                key, held = (str(msg["engine"]), str(msg["req"])), bool(msg["held"])
            except (ValueError, KeyError, TypeError):
                self.counters["bad_messages"] += 1
                continue
            rid = self.by_holder.get(key, "")
            pull = self.pulls.get(rid)
            if pull is None or pull.state != "awaiting_ack":
                continue
            if held:
                self._commit(rid, pull)
            else:
                self._fail(rid, "ERR:released:the prefill worker had already freed the blocks")
        now = time.monotonic()
        for rid, pull in list(self.pulls.items()):
            if pull.state == "awaiting_ack" and now > pull.deadline:
                self._fail(rid, f"ERR:timeout:no acknowledgement within {self.cfg.ack_timeout_s:g} s")
        for rid, xfer_id in list(self.unsettled.items()):
            if self._settled(xfer_id):
                self.engine.executor.collective_rpc("call", "kv", "finish", xfer_id)
                self.engine.release_quarantine(rid)
                del self.unsettled[rid]

    def _release_remote(self, pull: _Pull) -> None:
        pull.state = "awaiting_ack"
        pull.deadline = time.monotonic() + self.cfg.ack_timeout_s
        holder = pull.handle.agents[0]["agent_name"]
        msg = json.dumps({"op": "release", "req": pull.handle.request_id, "from": self.agent.name,
                          "md": self.md_b64}).encode()
        err = self.agent.send(holder, msg)
        if err:
            rid = next(r for r, p in self.pulls.items() if p is pull)
            self._fail(rid, f"ERR:peer:{err}")

    def _forget(self, rid: str) -> _Pull:
        pull = self.pulls.pop(rid)
        self.by_holder.pop((pull.handle.engine_id, pull.handle.request_id), None)
        return pull

    def _commit(self, rid: str, pull: _Pull) -> None:
        self._forget(rid)
        if pull.aborted:
            self.engine.abort_request(rid)
            return
        self.counters["transfers"] += 1
        self.counters["blocks_transferred"] += pull.num_blocks
        self.engine.commit_remote(rid, pull.handle.first_token)

    def _fail(self, rid: str, state: str) -> None:
        pull = self._forget(rid)
        _, kind, message = (state.split(":", 2) + ["", ""])[:3]
        error = {"peer": PeerGoneError, "timeout": TransferTimeoutError, "released": KVReleasedError}.get(
            kind, KVTransferError)(message)
        self.errors[rid] = error
        settled = self._settled(pull.xfer_id)
        if settled:
            self.engine.executor.collective_rpc("call", "kv", "finish", pull.xfer_id)
        else:
            self.unsettled[rid] = pull.xfer_id
        if pull.state == "reading":
            # Tell the holder it may free its copy (best effort: it may be the one that is gone).
            self.agent.send(pull.handle.agents[0]["agent_name"], json.dumps(
                {"op": "release", "req": pull.handle.request_id, "from": self.agent.name,
                 "md": self.md_b64}).encode())
        if pull.aborted:
            if not settled:
                self.engine.quarantine_blocks(rid)
            self.engine.abort_request(rid)
            return
        self.counters[f"fallback_{kind or 'error'}"] += 1
        self.counters["fallbacks"] += 1
        log.warning("KV pull for request %s failed (%s: %s); prefilling locally instead", rid,
                    type(error).__name__, message)
        self.engine.fallback_local(rid, quarantine=not settled)

    def _settled(self, xfer_id: str) -> bool:
        return all(self.engine.executor.collective_rpc("call", "kv", "settled", xfer_id))
