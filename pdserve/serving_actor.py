"""The actor every instance of `pdserve serve` runs: one class that serves either role, so that a role switch
(`pdserve role`) keeps the process, the weights and the KV pool: it drains, swaps the engine's KV connector
(LLMEngine.replace_kv_connector) and registers again under the new role (InstanceActor.switch_role).

NOTE: here, not in instance/: it combines both roles' classes, and only a layer above prefill_worker and
decode_worker may import both (docs/structure.md). The router reaches it by name and role-agnostic method names
(`prefill`, `generate`), so it needs no change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from decode_worker.actor import DecodeActor
from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from engine.rank_launcher import RankLauncher
from kv_transfer import TransferConfig
from metastore import MetadataStore
from prefill_worker.actor import PrefillActor
from prefill_worker.worker import PrefillWorker


class ServingWorker(PrefillWorker, DecodeWorker):
    """Both roles' entry points over one engine; `role` (given, then InstanceWorker.switch_role) says which the
    registry advertises and how the loop idles."""

    def __init__(self, instance_id: str, config: EngineConfig, transfer: TransferConfig | None = None,
                 store: MetadataStore | None = None, address: str = "",
                 role: Literal["prefill", "decode"] | None = None, rank_launcher: RankLauncher | None = None,
                 on_group_lost: Callable[[str], None] | None = None) -> None:
        if role is None:
            raise ValueError("a ServingWorker needs its starting role")
        super().__init__(instance_id, config, transfer, store, address, role, rank_launcher, on_group_lost)


class ServingActor(PrefillActor, DecodeActor):
    worker_cls = ServingWorker
    worker: ServingWorker
