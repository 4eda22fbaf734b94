"""One NIXL agent per worker rank: registers the rank's KV allocation once and moves blocks by READ.

It is the KV connector's worker part (engine.kv_connector.KVConnectorWorker): it lives inside the rank's
process, so every method takes and returns picklable values; the connector reaches every rank's agent through
the engine's `KVRanks.call(TransferAgent.<method>, ...)`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import socket
import time
from typing import Any, NamedTuple

import torch

from engine import envs
from engine.kv_cache import KVCache
from kv_transfer.config import TransferConfig
from kv_transfer.descriptor import PROTOCOL_VERSION, AgentDescriptor, check_compatible, same_node
from kv_transfer.errors import IncompatibleKVError, KVTransferError, PeerGoneError, TransferTimeoutError
from kv_transfer.local_copy import LocalPeers, share_of
from kv_transfer.nixl_reads import InFlightRead, NixlReads
from kv_transfer.plan import all_groups, sources
from kv_transfer.read_state import DONE, IN_FLIGHT, ReadState, ReadStats, error_from
from kv_transfer.transports import (
    disable_proto_report,
    enable_proto_report,
    quiet_stdout,
    report_path,
    selected_read_transports,
)

log = logging.getLogger(__name__)


class Met(NamedTuple):
    """What TransferAgent.meet did on one rank."""

    new: int  # peers prepared now
    failed: int  # peers it could not prepare (their first read tries again)


class TransferAgent:
    def __init__(self, kv: KVCache, engine_id: str, tp_rank: int, tp_size: int, total_kv_heads: int,
                 dtype: str, model_fingerprint: str, cfg: TransferConfig) -> None:
        """Register `kv` (one rank's whole KV allocation) with a new NIXL agent named after the engine."""
        from nixl._api import nixl_agent, nixl_agent_config

        cfg.apply_env()
        self.cfg = cfg
        lo = kv.layout
        self.name = f"{engine_id}-tp{tp_rank}-{os.getpid()}"
        self.mem_type = "VRAM" if kv.tensor.is_cuda else "DRAM"
        # NOTE: NIXL's progress thread spins a core even when idle. The driver rank polls the agent from its
        # step loop, so on CPU it goes without; the other TP ranks (blocked in collectives) and GPU workers
        # (cores to spare, latency matters) keep it.
        progress = cfg.progress_thread if cfg.progress_thread is not None else (
            self.mem_type == "VRAM" or tp_rank > 0)
        self.proto_dir = enable_proto_report() if cfg.log_transports else None
        with quiet_stdout():
            self.agent = nixl_agent(self.name, nixl_agent_config(
                enable_prog_thread=progress, backends=["UCX"], num_threads=cfg.num_threads))
        disable_proto_report(self.proto_dir)
        self.reg = self.agent.register_memory(kv.tensor)
        self.kv = kv  # NOTE: the registered memory must live as long as the agent (a caller may hold no reference)
        self.descriptor = AgentDescriptor(
            version=PROTOCOL_VERSION,
            engine_id=engine_id,
            agent_name=self.name,
            agent_metadata=self.agent.get_agent_metadata(),
            mem_type=self.mem_type,
            device_id=kv.tensor.device.index or 0,
            base_addr=kv.data_ptr(),
            num_blocks=lo.num_blocks,
            block_size=lo.block_size,
            block_bytes=lo.block_bytes,
            head_bytes=lo.head_bytes,
            num_kv_heads=lo.num_kv_heads,
            total_kv_heads=total_kv_heads,
            num_layers=lo.num_layers,
            head_dim=lo.head_dim,
            tp_rank=tp_rank,
            tp_size=tp_size,
            dtype=dtype,
            model_fingerprint=model_fingerprint,
            host=socket.gethostname(),
            node_ip=envs.PDSERVE_NODE_IP.get(),
            num_layer_groups=lo.num_layer_groups,
            share=share_of(kv.tensor, kv.memfd, os.getpid()) if cfg.local_copy_for(self.mem_type) else "",
        )
        self.all_groups = all_groups(self.descriptor)
        flat = kv.tensor.view(-1).view(torch.uint8)  # [total bytes]: this rank's cache, no copy
        self.local_peers = LocalPeers(self.descriptor, flat.numpy() if self.mem_type == "DRAM" else flat,
                                      kv.tensor.device, cfg.local_copy_for(self.mem_type),
                                      auto=cfg.local_copy is None)
        self.peers: dict[str, str] = {}  # agent_name -> NIXL remote name
        self.connected: set[str] = set()  # peers whose connection was opened ahead (know/add_peer_metadata)
        self.nixl_reads = NixlReads(self.agent, self.descriptor, cfg, self._peer)
        self.reads: dict[str, InFlightRead] = {}
        self.reported: set[str] = set()  # peers whose read transports were logged

    # ---- identity ------------------------------------------------------------------------------------------
    def describe(self) -> AgentDescriptor:
        return self.descriptor

    def _peer(self, desc: AgentDescriptor) -> str:
        name = self.peers.get(desc.agent_name)
        if name is None:
            raw = self.agent.add_remote_agent(desc.agent_metadata)
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            self.peers[desc.agent_name] = name
        return name

    def know(self, desc: AgentDescriptor, connect: bool = False) -> bool:
        """Load a peer's metadata now (e.g. to send it notifications before reading from it). `connect`: and open
        the UCX connection now, off the path of the first message. True when this call opened it."""
        peer = self._peer(desc)
        return self._connect(desc.agent_name, peer) if connect else False

    def _connect(self, agent_name: str, peer: str) -> bool:
        # NOTE: otherwise the first message sets the connection up on a request's path (with reads by local copy
        # nothing else connects the two rank-0 agents). Not what makes a fresh prefill instance's first step slow
        # on an H200: it stayed so with this (docs/performance.md, "A fresh cluster's first request on one H200")
        if agent_name in self.connected:
            return False
        with quiet_stdout():
            self.agent.make_connection(peer)
        self.connected.add(agent_name)
        return True

    def meet(self, holder: list[AgentDescriptor]) -> Met:
        """Before any read: ready what a read of the holder's agents (all its TP ranks) needs on this rank: the
        same-host mapping of each one it would copy locally, else its metadata and a UCX connection. What fails
        is logged (and counted by the caller) and left to the first read."""
        new = failed = 0
        try:
            check_compatible(self.descriptor, holder[0])
            chosen = sources(self.descriptor, holder)
        except Exception as e:  # NOTE: the first read reports it as the request's error
            log.warning("cannot prepare reads from %s: %s: %s", holder[0].agent_name, type(e).__name__, e)
            return Met(0, 1)
        for remote in chosen:
            if remote.agent_name in self.peers or remote.agent_name in self.local_peers.peers:
                continue
            new += 1
            peer = self.local_peers.get(remote)
            if peer is not None:
                if peer.whole_units and len(holder) == 1:  # as _post does after a read: checked compatible above
                    self.local_peers.direct[remote.agent_name] = peer
                continue
            try:
                self._connect(remote.agent_name, self._peer(remote))  # NOTE: recorded: `know` will not connect twice
            except Exception as e:
                failed += 1
                log.warning("could not connect to %s ahead of its first read: %s: %s", remote.agent_name,
                            type(e).__name__, e)
        return Met(new, failed)

    def add_peer_metadata(self, agent_name: str, metadata_b64: str, connect: bool = False) -> bool:
        """Learn a peer from its metadata alone (to send it notifications); `connect` as in `know`."""
        if agent_name not in self.peers:
            raw = self.agent.add_remote_agent(base64.b64decode(metadata_b64))
            self.peers[agent_name] = raw.decode() if isinstance(raw, bytes) else str(raw)
        return self._connect(agent_name, self.peers[agent_name]) if connect else False

    # ---- reads (decode side) -------------------------------------------------------------------------------
    def start_read(self, xfer_id: str, remotes: list[AgentDescriptor], local_blocks: list[int],
                   remote_blocks: list[int], groups: range | None = None) -> KVTransferError | None:
        """Post READs of remote_blocks into local_blocks for this rank's heads, in the layer groups `groups`
        (None: all). Returns None, or why not (IncompatibleKVError, PeerGoneError, KVTransferError)."""
        direct = self.local_peers.direct.get(remotes[0].agent_name) if len(remotes) == 1 else None
        if direct is not None:  # NOTE: the critical path of a same-host GPU read: nothing it does not need
            read = self.reads[xfer_id] = InFlightRead([], time.monotonic() + self.cfg.transfer_timeout_s, 0, 0)
            try:
                read.add_local(direct.read_units(local_blocks, remote_blocks,
                                                 self.all_groups if groups is None else groups))
            except Exception as e:
                read.state = ReadState.failed(error_from(e))
                return read.state.error
            return None
        try:
            for d in remotes:
                check_compatible(self.descriptor, d)
        except IncompatibleKVError as e:
            return e
        now = time.monotonic()
        read = InFlightRead([], now + self.cfg.transfer_timeout_s, 0, 0)
        # NOTE: only the ranks this one reads from (a replicated head is read from one replica).
        read.new_peers = [d for d in sources(self.descriptor, remotes) if d.agent_name not in self.reported]
        self.reads[xfer_id] = read
        try:
            with quiet_stdout() if read.new_peers else contextlib.nullcontext():
                self._post(read, remotes, local_blocks, remote_blocks,
                           all_groups(self.descriptor) if groups is None else groups)
        except Exception as e:
            read.state = ReadState.failed(error_from(e))
            return read.state.error
        return None

    def _post(self, read: InFlightRead, descs: list[AgentDescriptor], local_blocks: list[int],
              remote_blocks: list[int], groups: range) -> None:
        nixl = []
        for remote in sources(self.descriptor, descs):
            peer = self.local_peers.get(remote)
            if peer is None:
                read.local_copy_fallbacks += self.local_peers.wanted(remote)
                nixl.append(remote)
                continue
            read.add_local(peer.read(local_blocks, remote_blocks, groups))
            if peer.whole_units and len(descs) == 1:  # checked compatible above: later reads go direct
                self.local_peers.direct[remote.agent_name] = peer
        if not nixl:
            return
        # NOTE: one chosen holder per head range, so `sources` keeps them all
        self.nixl_reads.post(read, nixl, local_blocks, remote_blocks, groups)

    def poll(self, xfer_ids: list[str]) -> dict[str, ReadState]:
        """State of each read (a failure carries PeerGoneError, TransferTimeoutError or KVTransferError)."""
        out: dict[str, ReadState] = {}
        now = time.monotonic()
        for xid in xfer_ids:
            read = self.reads.get(xid)
            if read is None:
                out[xid] = ReadState.failed(KVTransferError(f"unknown transfer {xid}"))
                continue
            if read.state is IN_FLIGHT:
                try:
                    states = [self.agent.check_xfer_state(h) for h in read.handles]
                    if all(s == "DONE" for s in states) and all(e.query() for e in read.events):
                        read.state = DONE
                        self._report(read)
                    elif any(s == "ERR" for s in states):
                        read.state = ReadState.failed(PeerGoneError("transfer failed"))
                    elif now > read.deadline:
                        read.state = ReadState.failed(TransferTimeoutError(
                            f"no completion within {self.cfg.transfer_timeout_s:g} s"))
                except Exception as e:
                    read.state = ReadState.failed(error_from(e))
            out[xid] = read.state
        return out

    def _report(self, read: InFlightRead) -> None:
        for desc in read.new_peers:
            if desc.agent_name in self.reported:
                continue
            self.reported.add(desc.agent_name)
            if self.local_peers.peers.get(desc.agent_name) is not None:
                continue  # NOTE: read by local copy (logged when mapped): UCX carried none of its bytes
            report_path(self.name, self.mem_type, desc.mem_type, same_node(desc, self.descriptor),
                        selected_read_transports(self.proto_dir, self.name),
                        peer=f"{desc.agent_name}@{desc.node_ip or desc.host}")

    def settled(self, xfer_id: str) -> bool:
        """True once no handle of the read can still write into local memory (done, failed, or released)."""
        read = self.reads.get(xfer_id)
        if read is None:
            return True
        pending: list[Any] = []
        for e in read.events:
            try:
                if not e.query():
                    pending.append(e)
            except Exception as err:  # NOTE: a copy whose context failed writes nothing more
                log.warning("KV read %s: a local copy's end cannot be queried (%s): taken as ended", xfer_id, err)
        for h in read.handles:
            try:
                if self.agent.check_xfer_state(h) == "PROC":
                    pending.append(h)
            except Exception:
                pass  # an errored handle writes nothing more
        return not pending

    def finish(self, xfer_id: str) -> ReadStats:
        """Release the read's handles; returns its stats."""
        read = self.reads.pop(xfer_id, None)
        if read is None:
            return ReadStats()
        for h in read.handles:
            try:
                self.agent.release_xfer_handle(h)
            except Exception as e:  # a handle still in flight cannot be released; NIXL frees it with the agent
                log.warning("could not release transfer handle of %s: %s", xfer_id, e)
        return ReadStats(read.num_bytes, read.num_descs, read.local_bytes, read.local_copy_fallbacks)

    # ---- notifications (control messages between rank-0 agents) --------------------------------------------
    def partial_metadata_b64(self) -> str:
        import nixl._bindings as nb

        empty = nb.nixlRegDList(nb.DRAM_SEG)
        return base64.b64encode(self.agent.get_partial_agent_metadata(empty, inc_conn_info=True)).decode()

    def send(self, agent_name: str, message: bytes) -> str | None:
        try:
            self.agent.send_notif(self.peers[agent_name], message)
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def receive(self) -> list[tuple[str, bytes]]:
        return [(sender, m) for sender, msgs in self.agent.get_new_notifs().items() for m in msgs]

    def close(self) -> None:
        for xid in list(self.reads):
            self.finish(xid)
        for e in self.nixl_reads.release_lists():
            log.warning("could not release a prepared descriptor list: %s", e)
        try:
            self.agent.deregister_memory(self.reg)
        except Exception as e:
            log.warning("deregister_memory failed: %s", e)
        if self.proto_dir is not None:
            shutil.rmtree(self.proto_dir, ignore_errors=True)
