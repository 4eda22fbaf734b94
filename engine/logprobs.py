"""Logprobs of sampled tokens, for the requests that ask (`SamplingParams.logprobs`: k >= 0 top alternatives).

Computed per step over the batch's logits, only over the rows whose request asks: one log_softmax over those
rows and one topk with the largest k any of them asks (k <= MAX_TOP_LOGPROBS); nothing per sequence on the
device. The values are the model's own distribution (the logits before temperature, top-k or top-p), as
OpenAI's API reports them. On CUDA the results are copied to pinned host memory without waiting, so async
scheduling reads them with the step's tokens (engine/inflight.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's logprob and the `k` most likely tokens' at its position (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), k entries


@dataclass
class LogprobRows:
    """A step's logprobs for the rows that asked, on their way to the host."""

    rows: list[int]  # indices into the step's sampling rows
    ks: list[int]  # per row: how many top alternatives it asked for
    chosen: torch.Tensor  # [R] float32: the sampled token's logprob
    top_ids: torch.Tensor  # [R, K] int64
    top_values: torch.Tensor  # [R, K] float32

    @classmethod
    def compute(cls, logits: torch.Tensor, requests: list[Request], tokens: torch.Tensor) -> LogprobRows | None:
        """logits [N, V] (one row per sampling request), tokens [N] int64 (the sampled ids, on the device).
        None when no request asks (decided on the host: asking the device would wait)."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        if not rows:
            return None
        ks = [requests[i].sampling_params.logprobs or 0 for i in rows]
        index = torch.tensor(rows, device=logits.device)  # [R]
        logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # [R, V]
        chosen = logp.gather(1, tokens.index_select(0, index).unsqueeze(1)).squeeze(1)  # [R]
        top_values, top_ids = logp.topk(max(ks), dim=-1) if max(ks) else (logp[:, :0], logp[:, :0].long())
        if logits.is_cuda:  # NOTE: pinned, non-blocking: the step's ready event covers these copies too
            chosen, top_ids, top_values = (_to_pinned(t) for t in (chosen, top_ids, top_values))
        return cls(rows, ks, chosen, top_ids, top_values)

    def to_host(self, tokens: list[int]) -> list[TokenLogprob | None]:
        """One entry per sampling row, given the rows' sampled `tokens` (None where the request did not ask).
        Call once the step's tokens are on the host (on CUDA: after the inflight step's ready event)."""
        chosen, ids, values = self.chosen.tolist(), self.top_ids.tolist(), self.top_values.tolist()
        out: list[TokenLogprob | None] = [None] * len(tokens)
        for j, (row, k) in enumerate(zip(self.rows, self.ks, strict=True)):
            out[row] = TokenLogprob(tokens[row], chosen[j], tuple(zip(ids[j][:k], values[j][:k], strict=True)))
        return out


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
