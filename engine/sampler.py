"""Batched token sampling: greedy, temperature, top-k, top-p, and per-request seeded generators.

All filtering is vectorised over the batch. Random draws use the "exponential race" (argmax of p / E with
E ~ Exp(1) is a draw from p), so a seeded request consumes exactly one vocab-sized draw per token from its own
generator, whatever else is in the batch: its output is reproducible across batchings.
"""

from __future__ import annotations

import torch

from engine.logprobs import LogprobRows
from engine.request import Request


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits [N, V] float32, one row per request (same order) -> one token id per request."""
        return self.sample(logits, requests).tolist()

    @staticmethod
    def logprobs(logits: torch.Tensor, requests: list[Request], tokens: torch.Tensor) -> LogprobRows | None:
        """The sampled tokens' logprobs (and top-k alternatives) for the rows whose request asks; None when
        none does. logits [N, V], tokens [N] as `sample` returned them. Nothing waits for the device."""
        return LogprobRows.compute(logits, requests, tokens)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Like __call__, but returns the token ids as a tensor [N] int64 on the logits' device, without
        waiting for the device (async scheduling feeds it straight into the next step)."""
        params = [r.sampling_params for r in requests]
        greedy_rows = [p.temperature == 0.0 or p.top_k == 1 for p in params]
        if all(greedy_rows):
            return logits.argmax(dim=-1)
        dev = logits.device
        temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)  # [N]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=dev)  # [N]
        top_p = torch.tensor([p.top_p for p in params], device=dev)  # [N]
        # NOTE: whether any row filters is decided from the host-side params: asking the device would wait.
        filters = any(0 < p.top_k < logits.shape[-1] or p.top_p < 1.0 for p in params)
        scaled = logits / temp.unsqueeze(1)  # [N, V]
        probs = torch.softmax(_filter(scaled, top_k, top_p) if filters else scaled, dim=-1)  # [N, V]
        noise = torch.empty_like(probs).exponential_()  # [N, V]
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=r.generator).to(dev)
        sampled = (probs / noise).argmax(dim=-1)  # [N]
        greedy = torch.tensor(greedy_rows, device=dev)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus. logits [N, V]; top_k, top_p [N]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)  # [1, V]
    drop = ranks >= top_k.unsqueeze(1)  # [N, V]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass before it is < top_p: the top token always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
