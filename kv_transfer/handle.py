"""KVHandle: what a prefill-only run hands to the decode side: where the prompt's KV is, and the first token."""

from __future__ import annotations

from dataclasses import dataclass

from kv_transfer.descriptor import AgentDescriptor


@dataclass(frozen=True)
class KVHandle:
    engine_id: str  # the prefill engine holding the blocks
    request_id: str  # its request id there (the key of the held blocks and of the release message)
    block_ids: list[int]  # blocks covering the prompt, in token order
    num_tokens: int  # prompt tokens whose KV the blocks hold
    first_token: int  # sampled by the prefill worker
    agents: list[AgentDescriptor]  # every prefill TP rank's transfer agent, in rank order

    @property
    def holder(self) -> str:
        """The agent that serves control messages (rank 0's)."""
        return self.agents[0].agent_name


@dataclass(frozen=True)
class KVReader:
    """Where a prefill instance streams a request's layer-group progress to: the decode instance's rank-0 agent
    (its name, and its NIXL metadata with connection info only, enough to send notifications)."""

    agent_name: str
    metadata_b64: str


@dataclass(frozen=True)
class StreamedKV:
    """The decode side's source for a prompt still being prefilled (layer-wise streaming): which prefill engine
    computes it and under which request id, and its agents. The blocks, the progress and the first token come
    from the holder itself (kv_transfer/messages.py: StreamBlocks, StreamProgress)."""

    engine_id: str
    request_id: str
    num_tokens: int
    agents: list[AgentDescriptor]

    @property
    def holder(self) -> str:
        return self.agents[0].agent_name


@dataclass(frozen=True)
class KVEndpoint:
    """An instance's KV-transfer identity, which a router needs to stream a request between two instances: as a
    holder (its engine id and every TP rank's agent) and as a reader (where progress messages go)."""

    engine_id: str
    agents: list[AgentDescriptor]
    reader: KVReader
