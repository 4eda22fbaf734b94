"""The sampler: seeded reproducibility across batchings, top-k/top-p filtering, greedy rows in a mixed batch."""

from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from engine.request import Request
from engine.sampler import Sampler, _filter
from tests.model_factory import random_prompts


def test_seeded_sampling_is_reproducible_across_batchings(llm: LLM) -> None:
    prompts = random_prompts(4, [10, 40, 3, 77], 512, seed=30)
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate(prompts[0], params)[0].token_ids
    batched = llm.generate(prompts, params)
    again = llm.generate(prompts, params)
    assert batched[0].token_ids == alone
    assert [o.token_ids for o in batched] == [o.token_ids for o in again]
    other_seed = llm.generate(prompts[0], SamplingParams(**{**vars(params), "seed": 99}))[0].token_ids
    assert other_seed != alone  # 24 tokens at temperature 0.9: a coincidence here is vanishingly unlikely


def test_top_k_1_equals_greedy(llm: LLM) -> None:
    prompts = random_prompts(3, [5, 60, 130], 512, seed=31)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    topk1 = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=1.3, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in topk1] == [o.token_ids for o in greedy]


def test_top_k_keeps_exactly_the_k_largest() -> None:
    row = torch.randn(1, 512)
    kept = _filter(row, torch.tensor([5]), torch.tensor([1.0]))
    assert torch.isfinite(kept).sum() == 5
    assert set(torch.nonzero(torch.isfinite(kept[0])).flatten().tolist()) == set(row[0].topk(5).indices.tolist())


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = _filter(probs.log(), torch.tensor([4]), torch.tensor([0.8]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    kept = _filter(probs.log(), torch.tensor([4]), torch.tensor([0.81]))
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]
    # The most likely token always survives, however small top_p is.
    assert torch.isfinite(_filter(probs.log(), torch.tensor([4]), torch.tensor([0.01]))).tolist() == [
        [True, False, False, False]]


def test_sampler_greedy_rows_in_a_mixed_batch() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    reqs = [Request("a", [1], SamplingParams(temperature=0.0), 0),
            Request("b", [1], SamplingParams(temperature=1.0, seed=3), 1)]
    assert Sampler()(logits, reqs)[0] == 1
