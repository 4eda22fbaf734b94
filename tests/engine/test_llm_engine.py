"""LLMEngine, driven through its step-level interface (what the workers drive): greedy tokens equal transformers
under every scheduling condition (staggered arrivals, chunked prefill, prefix-cache hits, preemption), bad
requests refused while the others continue, aborts at any time, KV events, stats, dummy weights, streaming."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLMEngine, SamplingParams
from engine.block_hash import hash_blocks
from pdserve.dummy_model import write_dummy_model
from tests.conftest import run_to_completion
from tests.model_factory import hf_greedy, random_prompts

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
GREEDY_12 = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
GREEDY_4 = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def reference(model: pathlib.Path, prompt: list[int]) -> list[int]:
    return hf_greedy(model, prompt, NEW_TOKENS)


def test_kv_events_carry_the_chained_hashes(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"], block_size=16, num_kv_blocks=64, max_model_len=1024)
    prompt = random_prompts(1, [50], 512, seed=50)[0]
    engine.add_request("a", prompt, GREEDY_4)
    run_to_completion(engine)
    stored = [h for e in engine.take_kv_events() if e.kind == "stored" for h in e.block_hashes]
    # 50 prompt tokens (+ 3 computed outputs) = 3 full blocks, all prompt, hashed with the engine's salt.
    expected = hash_blocks(prompt, 16, engine.config.hash_salt)
    assert stored == expected
    assert engine.take_kv_events() == []
    # Fill the cache with other prompts: the LRU evicts a's blocks and reports them removed, tail first.
    for i, p in enumerate(random_prompts(4, [255, 255, 255, 255], 512, seed=51)):
        engine.add_request(f"f{i}", p, GREEDY_4)
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
        engine.add_request("d", list(range(3, 40)), GREEDY_4)
        outs.append(run_to_completion(engine)["d"])
    assert outs[0] == outs[1] and len(outs[0]) == 4


def test_stats_report_queue_and_usage(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"], num_kv_blocks=64, max_model_len=1024, max_num_seqs=1)
    engine.add_request("a", list(range(3, 40)), GREEDY_4)
    engine.add_request("b", list(range(3, 40)), GREEDY_4)
    engine.step()
    s = engine.stats()
    assert (s.num_running, s.num_waiting) == (1, 1)
    assert s.kv.num_used == 3 and 0 < s.kv_usage < 1
    run_to_completion(engine)
    assert engine.stats().kv.num_used == 0


def add_all(engine: LLMEngine, prompts: list[list[int]], prefix: str = "r") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, GREEDY)
    return ids


def test_staggered_batch_of_mixed_lengths(models: dict[str, pathlib.Path], engine_factory) -> None:
    model = models["llama"]
    engine = engine_factory(model, block_size=16, max_num_batched_tokens=256)
    prompts = random_prompts(10, [5, 180, 16, 47, 1, 99, 200, 33, 64, 130], 512, seed=11)
    done: dict[str, list[int]] = {}
    for step in range(10_000):
        if step % 3 == 0 and step // 3 < len(prompts):  # a new request every third step
            i = step // 3
            engine.add_request(f"r{i}", prompts[i], GREEDY)
        if step // 3 >= len(prompts) and not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert len(done) == len(prompts)
    for i, prompt in enumerate(prompts):
        assert done[f"r{i}"] == reference(model, prompt), f"request {i} (length {len(prompt)})"


@pytest.mark.parametrize("budget", [7, 24])
def test_chunked_prefill_splitting_blocks(models: dict[str, pathlib.Path], engine_factory, budget: int) -> None:
    model = models["qwen2"]
    engine = engine_factory(model, block_size=16, max_num_batched_tokens=budget, max_num_seqs=8)
    prompts = random_prompts(6, [200, 3, 77, 16, 130, 41], 512, seed=12)
    ids = add_all(engine, prompts)
    chunk_sizes: set[int] = set()
    schedule = engine.scheduler.schedule

    def recording_schedule():  # observe every step's batch without changing it
        out = schedule()
        assert out.total_tokens <= budget
        chunk_sizes.update(n for n in out.num_scheduled_tokens if n > 1)
        return out

    engine.scheduler.schedule = recording_schedule
    done = run_to_completion(engine)
    assert any(n % 16 for n in chunk_sizes), "some chunk must end inside a block"
    for rid, prompt in zip(ids, prompts, strict=True):
        assert done[rid] == reference(model, prompt)


def test_prefix_cache_hit_is_counted_and_exact(models: dict[str, pathlib.Path], engine_factory) -> None:
    model = models["mistral"]
    engine = engine_factory(model, block_size=16, enable_prefix_caching=True)
    shared = random_prompts(1, [80], 512, seed=13)[0]
    first = shared + [5, 6, 7]
    second = shared + [9, 10, 11, 12, 13]
    engine.add_request("a", first, GREEDY)
    assert run_to_completion(engine)["a"] == reference(model, first)
    before = engine.stats()
    engine.add_request("b", second, GREEDY)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    after = engine.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits == 80  # 5 full blocks of 16
    assert outs[0].num_cached_tokens == 80
    assert outs[0].token_ids == reference(model, second)
    # Identical prompt: every full block but the one holding the last token is reused.
    engine.add_request("c", first, GREEDY)
    assert run_to_completion(engine)["c"] == reference(model, first)
    assert engine.stats().prefix_cache_hits - after.prefix_cache_hits == 80


def test_concurrent_requests_share_prefix_blocks(models: dict[str, pathlib.Path], engine_factory) -> None:
    model = models["llama"]
    engine = engine_factory(model, block_size=16, max_num_batched_tokens=64)
    shared = random_prompts(1, [64], 512, seed=14)[0]
    prompts = [shared + random_prompts(1, [n], 512, seed=15 + n)[0] for n in (3, 20, 40)]
    engine.add_request("first", prompts[0], GREEDY)
    engine.step()  # 64-token budget: the first request's shared blocks are computed and published
    engine.step()
    add_all(engine, prompts[1:])
    done = run_to_completion(engine)
    assert engine.stats().prefix_cache_hits >= 2 * 64
    assert done["first"] == reference(model, prompts[0])
    assert done["r0"] == reference(model, prompts[1]) and done["r1"] == reference(model, prompts[2])


def test_preemption_with_tiny_cache(models: dict[str, pathlib.Path], engine_factory) -> None:
    model = models["llama_tied_rope3"]
    # 16 blocks of 16 tokens = one max-length sequence; eight requests cannot all fit.
    engine = engine_factory(model, block_size=16, num_kv_blocks=16, max_model_len=256, max_num_batched_tokens=128)
    prompts = random_prompts(8, [40, 150, 9, 77, 120, 30, 64, 100], 512, seed=16)
    ids = add_all(engine, prompts)
    done = run_to_completion(engine)
    assert engine.stats().num_preemptions > 0
    for rid, prompt in zip(ids, prompts, strict=True):
        assert done[rid] == reference(model, prompt)


def test_prefix_caching_disabled_and_block_size_4(models: dict[str, pathlib.Path], engine_factory) -> None:
    model = models["qwen2"]
    engine = engine_factory(model, block_size=4, enable_prefix_caching=False, max_num_batched_tokens=50)
    prompts = random_prompts(4, [13, 1, 57, 100], 512, seed=17)
    ids = add_all(engine, prompts + prompts[:1], prefix="x")
    done = run_to_completion(engine)
    assert engine.stats().prefix_cache_hits == 0
    for rid, prompt in zip(ids, prompts + prompts[:1], strict=True):
        assert done[rid] == reference(model, prompt)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], GREEDY_12, "prompt is empty"),
        ([5, 512, 7], GREEDY_12, "outside the vocabulary"),
        ([5, -1], GREEDY_12, "outside the vocabulary"),
        (list(range(3, 259)), GREEDY_12, "max_model_len"),
        ([5, 6], None, "max_tokens"),
        ([5, 6], "neg_temp", "temperature"),
    ],
)
def test_bad_request_is_refused_while_others_continue(models: dict[str, pathlib.Path], engine_factory,
                                                      prompt: list[int], params: object, message: str) -> None:
    model = models["llama"]
    engine = engine_factory(model, max_model_len=256)
    good = random_prompts(2, [40, 9], 512, seed=40)
    engine.add_request("good0", good[0], GREEDY_12)
    engine.step()  # the good request is mid-flight when the bad one arrives
    with pytest.raises(ValueError, match=message):
        if params is None:
            engine.add_request("bad", prompt, SamplingParams(max_tokens=0))
        elif params == "neg_temp":
            engine.add_request("bad", prompt, SamplingParams(temperature=-0.5))
        else:
            engine.add_request("bad", prompt, params)  # type: ignore[arg-type]
    assert "bad" not in engine.requests
    engine.add_request("good1", good[1], GREEDY_12)
    done = run_to_completion(engine)
    assert done == {"good0": hf_greedy(model, good[0], 12), "good1": hf_greedy(model, good[1], 12)}


def test_abort_at_any_time_frees_blocks(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"], max_num_batched_tokens=32)
    prompts = random_prompts(4, [100, 20, 60, 5], 512, seed=41)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    engine.abort_request("r3")  # waiting
    engine.step()
    engine.abort_request("r0")  # mid chunked prefill
    for _ in range(4):
        engine.step()
    engine.abort_request("r1")  # decoding
    engine.abort_request("nope")  # unknown ids are ignored
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["r2"].finish_reason == "length"
    assert engine.kv.stats().num_used == 0


def test_abort_reports_finish_reason_abort(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"])
    engine.add_request("x", [5, 6, 7], GREEDY_12)
    engine.step()
    engine.abort_request("x")
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("x", True, "abort")]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_work_counts_what_the_steps_computed(models: dict[str, pathlib.Path], engine_factory,
                                                 async_scheduling: bool) -> None:
    """The running totals the adaptive split calibrates with (engine/step_work.py), exact: a 40-token prompt in
    chunks of 16 while a 5-token one decodes, every step counted once with the context its rows attend to."""
    engine = engine_factory(models["llama"], max_num_batched_tokens=16, async_scheduling=async_scheduling)
    engine.add_request("short", [5, 6, 7, 8, 9], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    engine.step()  # short's prompt: 5 tokens, 15 pairs
    engine.add_request("long", random_prompts(1, [40], 512, seed=7)[0], GREEDY_4)
    run_to_completion(engine)
    work = engine.counters().work
    # long: chunks 11 (budget 16 less short's decode row), 15, 14 (while short decodes), then 3 decodes
    chunks = [(0, 11), (11, 15), (26, 14)]
    prefill_pairs = 15 + sum(n * done + n * (n + 1) // 2 for done, n in chunks)
    # short decodes 5 rows after its prompt (contexts 6..10), long 3 (41..43); 1 + 3 steps + the rest
    assert (work.prefill_tokens, work.prefill_pairs) == (45, prefill_pairs)
    assert (work.decode_seqs, work.decode_context) == (8, sum(range(6, 11)) + sum(range(41, 44)))
    assert work.tokens == 45 + 8 and work.seconds > 0
    assert work.steps == 1 + 3 + 3  # short prefill; three chunks (with short's decodes); long's three decodes
    # every step but the last had work after it, so the loop's next step closed its cycle; with async scheduling
    # the last step's tokens are read back by one more step (which computes nothing), so it has a cycle too
    assert work.cycles == (7 if async_scheduling else 6)
    assert 0 < work.cycle_step_seconds <= work.cycle_seconds and work.loop_overhead is not None
