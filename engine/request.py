"""A request is "num_computed_tokens of num_tokens", not a phase.

Prefill and decode are the same thing to the scheduler: schedule `num_tokens - num_computed_tokens` more
tokens (capped by the budget). A request whose KV was pulled from a prefill worker is simply added with
num_computed_tokens already at N.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.block_hash import BlockHash, hash_blocks
from engine.sampling_params import SamplingParams

PLACEHOLDER = -1  # all_token_ids entry of a token being sampled on the device; never fed to the model


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # blocks reserved, KV being pulled from a prefill worker
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival: int  # monotonically increasing admission order; lower = older = first within its class
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already published to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    stop_reason: int | str | None = None
    # 1 while the last entry of all_token_ids is a placeholder for a token still being sampled on the device
    # (async scheduling): the next step can already compute with it; resolve_token fills it in.
    num_pending: int = 0
    kv_load_failed: bool = False  # its prompt's KV was to be loaded, the load failed, it was prefilled here

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling_params.seed)

    @property
    def order(self) -> tuple[int, int]:
        """The scheduler's order: class first (interactive before batch), then age."""
        return (int(self.sampling_params.priority), self.arrival)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

    def update_block_hashes(self, block_size: int, salt: str) -> None:
        """Extend `block_hashes` to cover every full block of the current tokens (incremental)."""
        done = len(self.block_hashes)
        parent = self.block_hashes[-1] if done else None
        tokens = self.all_token_ids[: len(self.all_token_ids) - self.num_pending] if self.num_pending \
            else self.all_token_ids  # NOTE: a placeholder must never reach a block hash
        self.block_hashes.extend(hash_blocks(tokens, block_size, salt, parent=parent, start=done * block_size))

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_placeholder(self) -> None:
        """The next token is being sampled on the device: count it, so the scheduler can schedule the step that
        consumes it, before its value is known."""
        assert not self.num_pending, "a request has at most one token in flight"
        self.all_token_ids.append(PLACEHOLDER)
        self.num_pending = 1

    def resolve_token(self, token_id: int) -> None:
        """The placeholder's value has arrived."""
        self.all_token_ids[-1] = token_id
        self.output_token_ids.append(token_id)
        self.num_pending = 0

    def finishes_by_length_after_next(self) -> bool:
        """True if the next sampled token certainly ends the request (max_tokens or max_model_len)."""
        return self.num_output_tokens + 1 >= self.sampling_params.max_tokens or \
            self.num_tokens + 1 >= self.max_model_len

    def check_stop(self) -> RequestStatus | None:
        """Token-level stop conditions, checked after each appended token (stop strings are the detokenizer's)."""
        sp = self.sampling_params
        last = self.output_token_ids[-1]
        if not sp.ignore_eos and last in self.eos_token_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if last in sp.stop_token_ids:
            self.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= sp.max_tokens or self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
