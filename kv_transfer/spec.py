"""How the engine builds the NIXL KV connector (engine.kv_connector.KVConnectorSpec): a TransferAgent on every
TP rank, and the role's scheduler side (KVProducer for prefill, KVConsumer for decode) in the driver process.

    engine = LLMEngine(config, kv_connector=NixlConnectorSpec("decode-0", "decode", TransferConfig()))

The pull protocol:

    prefill (KVProducer)                                 decode (KVConsumer)
    request finishes: blocks held under a lease,  ─────► add_request(prompt, kv_source=KVHandle)
      the output carries a KVHandle                        reserve blocks (prefix-cache hits skipped)
                                                           one READ per (decode rank, prefill rank)
                                                           for exactly the missing blocks, coalesced
                    ◄────────── ReleaseRequest ──────────  when every rank's READ is done
      free the blocks; ReleaseAck(held) ───────────────►   held -> loaded: prompt computed, first token out
                                                           not held / error / timeout -> failed: the engine
                                                           prefills locally (logged and counted)

The holder answers held=False when it had already freed the blocks (lease expiry, abort): whatever was read may
have been overwritten, so the reader never uses it. A lease frees blocks no reader comes for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.config import EngineConfig
from engine.kv_cache import KVCache
from engine.kv_connector import KVConnector, KVRanks
from kv_transfer.agent import TransferAgent
from kv_transfer.config import TransferConfig
from kv_transfer.consumer import KVConsumer
from kv_transfer.descriptor import AgentDescriptor
from kv_transfer.producer import KVProducer


@dataclass(frozen=True)
class NixlConnectorSpec:
    engine_id: str  # names the agents and the instance in KV handles
    role: Literal["prefill", "decode"]  # prefill holds KV for readers; decode loads it
    cfg: TransferConfig = field(default_factory=TransferConfig)

    def make_worker(self, kv_cache: KVCache, config: EngineConfig, rank: int) -> TransferAgent:
        mc = config.model_config
        return TransferAgent(kv_cache, self.engine_id, rank, config.tensor_parallel_size, mc.num_key_value_heads,
                             config.dtype_name, mc.fingerprint(), self.cfg)

    def make_connector(self, ranks: KVRanks, descriptors: list[AgentDescriptor]) -> KVConnector:
        agent = ranks.local
        assert isinstance(agent, TransferAgent)
        cls = KVProducer if self.role == "prefill" else KVConsumer
        return cls(ranks, agent, descriptors, self.engine_id, self.cfg)
