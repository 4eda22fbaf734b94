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
