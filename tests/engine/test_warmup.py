"""The engine's warm-up (engine/warmup.py): it runs every step shape it names, through the real step path, and the
engine then starts as if it had run nothing: no cached prefix, no KV events, no counted steps, exact outputs."""

from __future__ import annotations

import pathlib

from engine import SamplingParams
from engine.config import EngineConfig
from tests.conftest import run_to_completion
from tests.model_factory import hf_greedy, random_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_the_warm_up_runs_every_step_shape_then_leaves_a_clean_engine(models: dict[str, pathlib.Path],
                                                                       engine_factory) -> None:
    model = models["llama"]
    engine = engine_factory(model, warmup=True, block_size=16, max_num_batched_tokens=128, max_model_len=512)
    report = engine.warmup
    assert report is not None
    assert report.covers() == {k: True for k in report.covers()}, report.steps
    assert len(report.steps) < 60
    # nothing of it is left: no cached blocks (a first request finds no prefix), no events to publish, no counts
    assert engine.take_kv_events() == []
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.kv_usage) == (0, 0, 0.0)
    assert stats.kv.num_cached == 0 and stats.kv.num_used == 0
    assert engine.metrics.steps == 0 and engine.finished_totals == (0, 0, 0)
    assert engine.work.totals().steps == 0
    prompt = random_prompts(1, [70], 512, seed=7)[0]
    engine.add_request("a", prompt, GREEDY)
    assert run_to_completion(engine)["a"] == hf_greedy(model, prompt, 8)
    assert engine.stats().prefix_cache_hits == 0


def test_the_warm_up_is_on_for_cuda_and_off_on_cpu_unless_asked(models: dict[str, pathlib.Path]) -> None:
    cfg = EngineConfig(model=str(models["llama"]), device="cpu")
    assert cfg.warmup is None and cfg.resolved().warmup is False
    assert EngineConfig(model=str(models["llama"]), device="cpu", warmup=True).resolved().warmup is True
    assert not cfg.is_resolved and cfg.resolved().is_resolved


def test_an_engine_without_warm_up_reports_none(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"], device="cpu")
    assert engine.warmup is None


def test_with_dense_prefill_buckets_the_warm_up_runs_each_padded_length(models: dict[str, pathlib.Path],
                                                                       engine_factory,
                                                                       monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_DENSE_PREFILL_BUCKET", "64")
    engine = engine_factory(models["llama"], warmup=True, dtype="bfloat16", max_num_batched_tokens=512,
                            max_model_len=1024)
    report = engine.warmup
    assert report is not None and report.dense_lengths == [256, 320, 384, 448, 512]
    assert report.covers()["every padded dense length"]
    assert all(report.covers().values())
    # a step's longest dense prompt (max_model_len - 1 = 499 tokens) pads to 512: that length is run too, by a
    # 499-token prompt
    short = engine_factory(models["llama"], warmup=True, dtype="bfloat16", max_num_batched_tokens=512,
                           max_model_len=500)
    assert short.warmup is not None and short.warmup.dense_lengths[-1] == 512
    assert any(x.tokens == 499 and x.prompts == 1 for x in short.warmup.steps) and all(short.warmup.covers().values())
    monkeypatch.setenv("PDSERVE_DENSE_PREFILL_BUCKET", "0")
    plain = engine_factory(models["llama"], warmup=True, dtype="bfloat16", max_num_batched_tokens=512,
                           max_model_len=1024)
    assert plain.warmup is not None and plain.warmup.dense_lengths == [] and "every padded dense length" not in \
        plain.warmup.covers()
