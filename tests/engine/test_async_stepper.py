"""Async scheduling (engine/async_stepper.py, engine/inflight.py) against the synchronous loop: same tokens, same
prefix-cache hashes, no leaked blocks, and every request finished exactly once, through preemption, aborts, stops
and shared prefixes. On CPU the forward is synchronous anyway, so these check the protocol's bookkeeping; the
device overlap is measured by bench/gpu_throughput.py."""

from __future__ import annotations

import pathlib
from collections import Counter

import pytest

from engine import LLMEngine, SamplingParams
from engine.block_hash import hash_blocks
from engine.request import PLACEHOLDER
from tests.model_factory import random_prompts


def _params(i: int) -> SamplingParams:
    """A mix: greedy and seeded sampling with top-k/top-p, lengths 1..17, some stopping on a token."""
    if i % 3 == 0:
        return SamplingParams(max_tokens=1 + (i * 5) % 17, temperature=0.0, ignore_eos=True)
    if i % 3 == 1:
        return SamplingParams(max_tokens=1 + (i * 7) % 17, temperature=0.8, top_k=20, top_p=0.9, seed=i,
                              ignore_eos=True)
    return SamplingParams(max_tokens=16, temperature=1.0, seed=i, stop_token_ids=[7, 11, 13, 17, 19, 23, 29, 31])


def _run(engine: LLMEngine, prompts: list[list[int]], abort_at: dict[int, str]) -> tuple[dict, Counter, set]:
    """Add every prompt, step to the end (aborting `abort_at[step]` on the way), and return request id ->
    final tokens, how often each id was reported finished, and every block hash the cache stored."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _params(i))
    done: dict[str, tuple[list[int], str | None]] = {}
    finished: Counter = Counter()
    step = 0
    while engine.has_unfinished_requests():
        if step in abort_at:
            engine.abort_request(abort_at[step])
        for out in engine.step():
            assert PLACEHOLDER not in out.token_ids and PLACEHOLDER not in out.new_token_ids
            if out.finished:
                finished[out.request_id] += 1
                done[out.request_id] = (list(out.token_ids), out.finish_reason)
        step += 1
        assert step < 5000
    stored = {h for e in engine.take_kv_events() if e.kind == "stored" for h in e.block_hashes}
    return done, finished, stored


@pytest.mark.parametrize("num_kv_blocks", [64, 20])
def test_async_equals_sync(models: dict[str, pathlib.Path], engine_factory, num_kv_blocks: int) -> None:
    """20 blocks of 16 tokens force preemptions; shared prefixes exercise the prefix cache; two aborts land
    while the aborted request's token is in flight."""
    base = random_prompts(12, [40, 150, 9, 77, 120, 30, 64, 100, 1, 33, 16, 48], 512, seed=21)
    prompts = base + [base[1][:64] + base[3][:20], base[6] + [5, 6, 7]]  # shared 64-token / whole prefixes
    runs = {}
    for mode in (False, True):
        engine = engine_factory(models["llama"], block_size=16, num_kv_blocks=num_kv_blocks, max_model_len=256,
                                max_num_batched_tokens=96, max_num_seqs=6, async_scheduling=mode)
        runs[mode] = _run(engine, prompts, abort_at={3: "r2", 9: "r7"})
        if num_kv_blocks == 20:
            assert engine.stats().num_preemptions > 0
    (sync_done, sync_fin, sync_hashes), (async_done, async_fin, async_hashes) = runs[False], runs[True]
    assert set(sync_fin) == set(async_fin) == {f"r{i}" for i in range(len(prompts))}
    assert set(sync_fin.values()) == set(async_fin.values()) == {1}
    for rid in sync_done:
        if rid in ("r2", "r7"):  # aborted: a prefix of the full output, possibly of different length
            assert async_done[rid][1] == sync_done[rid][1] == "abort"
            continue
        assert async_done[rid] == sync_done[rid], rid
    # Every hash either run stored belongs to a full block of some request's real tokens (a placeholder in a
    # hashed block would give a hash outside this set), and outside the aborted requests the two runs agree.
    salt = engine.config.hash_salt

    def real_hashes(done: dict, rids: list[str]) -> set:
        return {h for r in rids for h in hash_blocks(prompts[int(r[1:])] + done[r][0], 16, salt)}

    everyone = [f"r{i}" for i in range(len(prompts))]
    kept = [r for r in everyone if r not in ("r2", "r7")]
    assert sync_hashes <= real_hashes(sync_done, everyone)
    assert async_hashes <= real_hashes(async_done, everyone), "a placeholder reached a block hash"
    assert sync_hashes & real_hashes(sync_done, kept) == async_hashes & real_hashes(sync_done, kept)


def test_one_token_requests_cost_no_extra_step(models: dict[str, pathlib.Path], engine_factory) -> None:
    """The prefill role's requests (max_tokens 1) end by length: they get no placeholder and are not scheduled
    again, so a prompt costs exactly one forward."""
    engine = engine_factory(models["llama"], async_scheduling=True)
    calls = []
    real = engine.executor.execute
    engine.executor.execute = lambda inp, prev=None: calls.append(len(inp.seq_lens)) or real(inp, prev)
    engine.add_request("p", list(range(3, 40)), SamplingParams(max_tokens=1, temperature=0.0))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert calls == [1]
    assert len(outs) == 1 and outs[0].finished and len(outs[0].token_ids) == 1


def test_step_returns_the_previous_steps_tokens(models: dict[str, pathlib.Path], engine_factory) -> None:
    """The first call launches and returns nothing; every later call returns the token launched before it."""
    engine = engine_factory(models["llama"], async_scheduling=True)
    engine.add_request("s", [5, 6, 7, 8], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    per_call = [[t for o in engine.step() for t in o.new_token_ids] for _ in range(4)]
    assert [len(x) for x in per_call] == [0, 1, 1, 1]
    assert not engine.has_unfinished_requests()


def test_a_step_that_only_reads_the_last_tokens_counts_with_the_work(models: dict[str, pathlib.Path],
                                                                      engine_factory) -> None:
    """Its time is the rest of the last work step's device time: the adaptive split's calibration would otherwise
    see an instance between bursts run faster than its profile (engine/step_work.py, add_wait)."""
    engine = engine_factory(models["llama"], async_scheduling=True)
    engine.add_request("s", [5, 6, 7, 8], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    before = engine.counters().work
    assert engine.stepper.has_inflight and before.steps == 3
    engine.step()  # schedules nothing: reads the last decode's token
    after = engine.counters().work
    # no step or token more; its start closed the last work step's cycle, as any next step's start does
    assert (after.steps, after.tokens, after.cycles) == (before.steps, before.tokens, before.cycles + 1)
    assert after.seconds > before.seconds and not engine.stepper.has_inflight
    engine.step()  # nothing launched, nothing to read: nothing counted
    assert engine.counters().work.seconds == after.seconds
