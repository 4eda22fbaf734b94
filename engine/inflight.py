"""Async scheduling: the step whose sampled tokens are still on the device while the next step is launched.

Reading a step's tokens waits for the device; everything the host does between that wait and the next launch
(postprocess, schedule, build inputs, launch) leaves the GPU idle: 5-8% of a decode step on an H200. With async
scheduling the engine launches step n+1 first and reads step n's tokens after, so that host work overlaps the
device's work on step n+1. `AsyncStepper.run` (engine/async_stepper.py) runs it:

  1. schedule step n+1; a request whose step-n token is still in flight carries a PLACEHOLDER as its last token
     (so the scheduler sees one token to compute, as for any decode);
  2. launch step n+1; `StepInput.feed` names, for each placeholder, the row of step n's sampled tokens that the
     device puts in its place (no host round trip);
  3. resolve step n: wait for its tokens, fill in the placeholders, apply the stop rules. A request that stopped
     at step n had one more row computed in step n+1, which is dropped: its output is never read;
  4. advance step n+1's requests and give those that sample a placeholder, except where the token will end the
     request by length anyway (max_tokens, max_model_len): they are not scheduled again, so the prefill role's
     one-token requests cost no extra step.

A placeholder never reaches a block hash (Request.update_block_hashes stops before it), and step n+1's inputs
are in stream order after step n's sampling, so the device always reads the real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.logprobs import LogprobRows
from engine.request import Request


def feed_tokens(input_ids: torch.Tensor, feed: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
    """input_ids [T] with placeholders, feed [T] (row of prev_tokens or -1), prev_tokens [P] -> input_ids [T]
    with the placeholders replaced, on the device."""
    return torch.where(feed >= 0, prev_tokens[feed.clamp(min=0)], input_ids)


@dataclass
class InflightStep:
    """A launched step's sampling rows and their tokens, being copied to the host."""

    requests: list[Request]  # the rows that sample, in logits order
    pending: list[bool]  # per row: the request carries a placeholder for this token
    tokens: torch.Tensor  # [N] int64 on the device: the next step's feed reads it
    host: torch.Tensor  # [N] int64, pinned on CUDA: filled by a non-blocking copy
    ready: torch.cuda.Event | None  # passed once `host` holds the tokens (None on CPU: already there)
    logprobs: LogprobRows | None = None  # for the rows that asked; copied to the host before `ready` passes

    @classmethod
    def launch(cls, requests: list[Request], pending: list[bool], tokens: torch.Tensor,
               logprobs: LogprobRows | None = None) -> InflightStep:
        if not tokens.is_cuda:
            return cls(requests, pending, tokens, tokens, None, logprobs)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)  # [N]
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(requests, pending, tokens, host, ready, logprobs)

    def wait(self) -> list[int]:
        """The sampled token ids (waits for the device)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()

    def feed(self, requests: list[Request], query_start_loc: np.ndarray) -> np.ndarray | None:
        """StepInput.feed for a step over `requests` (row starts `query_start_loc` [B+1]): each request with a
        placeholder computes it as its last scheduled token, which takes this step's token of that request."""
        rows = {id(r): i for i, (r, p) in enumerate(zip(self.requests, self.pending, strict=True)) if p}
        feed: np.ndarray | None = None
        for j, r in enumerate(requests):
            if r.num_pending:
                if feed is None:
                    feed = np.full(int(query_start_loc[-1]), -1, dtype=np.int64)  # [T]
                feed[query_start_loc[j + 1] - 1] = rows[id(r)]
        return feed

