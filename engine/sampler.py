"""Batched token sampling: greedy, temperature, top-k, top-p, and per-request seeded generators.

All filtering is vectorised over the batch. Random draws use the "exponential race" (argmax of p / E with
E ~ Exp(1) is a draw from p), so a seeded request consumes exactly one vocab-sized draw per token from its own
generator, whatever else is in the batch: its output is reproducible across batchings.
"""

from __future__ import annotations

import torch

from engine.request import Request


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits [N, V] float32, one row per request (same order) -> one token id per request."""
        params = [r.sampling_params for r in requests]
        greedy_rows = [p.temperature == 0.0 or p.top_k == 1 for p in params]
        if all(greedy_rows):
            return logits.argmax(dim=-1).tolist()
        dev = logits.device
        temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)  # [N]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=dev)  # [N]
        top_p = torch.tensor([p.top_p for p in params], device=dev)  # [N]
        probs = torch.softmax(_filter(logits / temp.unsqueeze(1), top_k, top_p), dim=-1)  # [N, V]
        noise = torch.empty_like(probs).exponential_()  # [N, V]
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i] = torch.empty(probs.shape[1]).exponential_(generator=r.generator).to(dev)
        sampled = (probs / noise).argmax(dim=-1)  # [N]
        greedy = torch.tensor(greedy_rows, device=dev)
        return torch.where(greedy, logits.argmax(dim=-1), sampled).tolist()


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus. logits [N, V]; top_k, top_p [N]."""
    if bool((top_k >= logits.shape[-1]).all()) and bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)  # [1, V]
    drop = ranks >= top_k.unsqueeze(1)  # [N, V]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep a token while the mass before it is < top_p: the top token always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
