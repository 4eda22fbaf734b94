"""Logprobs from the sampler equal transformers' log_softmax of the logits for the same greedy tokens, with the
synchronous and the async stepper, for the requests that ask only (others in the same batch get none)."""

from __future__ import annotations

import pathlib

import pytest

from engine import SamplingParams
from engine.logprobs import TokenLogprob
from tests.model_factory import hf_greedy, hf_logprobs, random_prompts

N = 8


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_logprobs_equal_transformers(models: dict[str, pathlib.Path], engine_factory, async_scheduling: bool) -> None:
    model = models["llama"]
    engine = engine_factory(model, block_size=16, num_kv_blocks=64, max_model_len=512,
                            async_scheduling=async_scheduling, device="cpu")
    prompts = random_prompts(3, [20, 37, 5], 512, seed=7)
    asks = {"a": 5, "b": None, "c": 0}
    for (rid, k), prompt in zip(asks.items(), prompts, strict=True):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, logprobs=k))
    got: dict[str, list[TokenLogprob | None]] = {rid: [] for rid in asks}
    tokens: dict[str, list[int]] = {rid: [] for rid in asks}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.new_logprobs is not None:
                assert len(out.new_logprobs) == len(out.new_token_ids)
                got[out.request_id] += out.new_logprobs
    assert got["b"] == []  # did not ask: nothing computed for it
    for (rid, k), prompt in zip(asks.items(), prompts, strict=True):
        assert tokens[rid] == hf_greedy(model, prompt, N)
        if k is None:
            continue
        ref = hf_logprobs(model, prompt, tokens[rid])  # [N, V]
        assert [lp.token_id for lp in got[rid]] == tokens[rid]  # type: ignore[union-attr]
        for i, lp in enumerate(got[rid]):
            assert lp is not None
            assert lp.logprob == pytest.approx(ref[i, tokens[rid][i]].item(), abs=1e-4)
            assert len(lp.top) == k
            if k:
                values, ids = ref[i].topk(k)
                assert [t for t, _ in lp.top] == ids.tolist()
                assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
                assert lp.top[0][0] == tokens[rid][i]  # greedy: the sampled token is the most likely


def test_logprobs_are_validated() -> None:
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(ValueError, match="logprobs must be an integer in"):
            SamplingParams(logprobs=bad)  # type: ignore[arg-type]
    assert SamplingParams(logprobs=20).logprobs == 20 and SamplingParams().logprobs is None
