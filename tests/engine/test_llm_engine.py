"""The step-level interface the workers drive: KV events, stats, dummy weights, streaming outputs."""

from __future__ import annotations

import pathlib

from engine import SamplingParams
from engine.block_hash import hash_blocks
from pdserve.dummy_model import write_dummy_model
from tests.conftest import run_to_completion
from tests.model_factory import random_prompts

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_kv_events_carry_the_chained_hashes(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"], block_size=16, num_kv_blocks=64, max_model_len=1024)
    prompt = random_prompts(1, [50], 512, seed=50)[0]
    engine.add_request("a", prompt, GREEDY)
    run_to_completion(engine)
    stored = [h for e in engine.take_kv_events() if e.kind == "stored" for h in e.block_hashes]
    # 50 prompt tokens (+ 3 computed outputs) = 3 full blocks, all prompt, hashed with the engine's salt.
    expected = hash_blocks(prompt, 16, engine.config.hash_salt)
    assert stored == expected
    assert engine.take_kv_events() == []
    # Fill the cache with other prompts: the LRU evicts a's blocks and reports them removed, tail first.
    for i, p in enumerate(random_prompts(4, [255, 255, 255, 255], 512, seed=51)):
        engine.add_request(f"f{i}", p, GREEDY)
        run_to_completion(engine)
    removed = [h for e in engine.take_kv_events() if e.kind == "removed" for h in e.block_hashes]
    assert set(expected) <= set(removed)
    assert removed.index(expected[2]) < removed.index(expected[0])


def test_streaming_outputs_one_token_per_step(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"])
    engine.add_request("s", [5, 6, 7, 8], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    seen: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert len(out.new_token_ids) == 1
            seen += out.new_token_ids
            assert out.token_ids == seen
    assert len(seen) == 5


def test_dummy_weights_are_deterministic(tmp_path: pathlib.Path, engine_factory) -> None:
    model = write_dummy_model(tmp_path / "dummy", "small")
    outs = []
    for _ in range(2):
        engine = engine_factory(model, load_format="dummy", max_model_len=256)
        engine.add_request("d", list(range(3, 40)), GREEDY)
        outs.append(run_to_completion(engine)["d"])
    assert outs[0] == outs[1] and len(outs[0]) == 4


def test_stats_report_queue_and_usage(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"], num_kv_blocks=64, max_model_len=1024, max_num_seqs=1)
    engine.add_request("a", list(range(3, 40)), GREEDY)
    engine.add_request("b", list(range(3, 40)), GREEDY)
    engine.step()
    s = engine.stats()
    assert (s.num_running, s.num_waiting) == (1, 1)
    assert s.kv.num_used == 3 and 0 < s.kv_usage < 1
    run_to_completion(engine)
    assert engine.stats().kv.num_used == 0
