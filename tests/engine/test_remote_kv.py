"""The engine's side of the KV connector interface (engine/remote_kv.py), driven by a scripted in-process
connector: loads that succeed, fail (settled or not) and are cancelled; held blocks released or aborted. The
block accounting is checked with exact block ids. (The NIXL connector itself: tests/kv_transfer/.)"""

from __future__ import annotations

import dataclasses
import pathlib
from collections import Counter
from typing import Any

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kv_connector import KVConnector, KVConnectorEvents, KVRanks, LoadDone, LoadFailed
from engine.priority import Priority
from engine.request import Request
from tests.conftest import assert_all_free, run_to_completion
from tests.model_factory import hf_greedy, random_prompts


class ScriptedConnector(KVConnector):
    """Loads nothing itself: the test decides what each poll reports. Holds every finished request."""

    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.counters: Counter[str] = Counter()
        self.next = KVConnectorEvents()
        self.loads: dict[str, tuple[list[int], int]] = {}  # request id -> (block ids, cached blocks)
        self.in_flight: set[str] = set()  # cancel_load answers False for these

    def start_load(self, request: Request, source: Any, num_cached_blocks: int) -> int:
        if source == "refuse":
            raise ValueError("refused")
        self.loads[request.request_id] = (list(request.block_ids), num_cached_blocks)
        return len(request.block_ids) - num_cached_blocks

    def cancel_load(self, request_id: str) -> bool:
        return request_id not in self.in_flight

    def request_finished(self, request: Request) -> Any | None:
        return ("handoff", list(request.block_ids)) if self.hold else None

    def drop_held(self, request_id: str) -> None:
        self.counters["dropped"] += 1

    def poll(self) -> KVConnectorEvents:
        events, self.next = self.next, KVConnectorEvents()
        return events

    def has_work(self) -> bool:
        return False


class ScriptedSpec:
    def __init__(self, hold: bool) -> None:
        self.connector = ScriptedConnector(hold)

    def make_worker(self, kv_cache: Any, config: EngineConfig, rank: int) -> Any:
        class Part:
            def describe(self) -> str:
                return f"rank{rank}"

            def close(self) -> None:
                pass

        return Part()

    def make_connector(self, ranks: KVRanks, descriptors: list[Any]) -> KVConnector:
        assert descriptors == ["rank0"]
        return self.connector


@pytest.fixture
def make(models: dict[str, pathlib.Path]):
    made: list[LLMEngine] = []

    def build(hold: bool, **kwargs: Any) -> tuple[LLMEngine, ScriptedConnector]:
        spec = ScriptedSpec(hold)
        engine = LLMEngine(EngineConfig(model=str(models["llama"]), dtype="float32", num_kv_blocks=16,
                                        max_model_len=256, **kwargs), spec)
        made.append(engine)
        return engine, spec.connector

    yield build
    for engine in made:
        try:
            assert engine.remote is not None and not engine.remote.held and not engine.remote.quarantined
            assert_all_free(engine)
        finally:
            engine.shutdown()


GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_held_blocks_stay_until_released_or_aborted(make) -> None:
    engine, conn = make(hold=True)
    engine.add_request("a", list(range(3, 40)), SamplingParams(max_tokens=1, temperature=0.0))  # 3 blocks
    engine.add_request("b", list(range(50, 60)), SamplingParams(max_tokens=1, temperature=0.0))  # 1 block
    outs = {o.request_id: o for o in run_to_completion_outputs(engine)}
    assert outs["a"].kv_handoff == ("handoff", [0, 1, 2]) and outs["b"].kv_handoff == ("handoff", [3])
    assert engine.stats().num_held == 2 and engine.kv.stats().num_used == 4
    conn.next.released.append("a")  # a reader is done with a's blocks
    engine.step()
    assert engine.kv.stats().num_used == 1 and engine.stats().num_held == 1
    engine.abort_request("b")  # an abort frees b's held blocks at once and tells the connector
    assert engine.kv.stats().num_used == 0 and conn.counters["dropped"] == 1
    assert engine.step() == []  # an aborted held request was already reported finished: nothing more


def test_loaded_prompt_decodes_from_its_first_token(make, models: dict[str, pathlib.Path]) -> None:
    engine, conn = make(hold=False)
    prompt = random_prompts(1, [40], 512, seed=5)[0]
    # Compute the prompt's KV into the cache first (a local run), so that "loading" it leaves valid KV in place.
    engine.add_request("warm", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    first = run_to_completion(engine)["warm"][0]  # it used blocks 0, 1 (full, now cached) and 2 (freed)
    assert engine.add_request("r", prompt, GREEDY, kv_source="src") == 1  # the 2 full blocks were cached here
    blocks, cached = conn.loads["r"]
    assert blocks[:2] == [0, 1] and cached == 2 and blocks[2] not in (0, 1)
    kv = engine.executor.runner.kv_cache.tensor
    kv[:, blocks[2]].copy_(kv[:, 2])  # "load" the last block: what a transfer would have written
    conn.next.loaded.append(LoadDone("r", first))
    outs = run_to_completion(engine)
    assert outs["r"] == hf_greedy(models["llama"], prompt, 4)


def test_first_token_goes_out_before_the_kv_and_the_load_completes_after(make,
                                                                      models: dict[str, pathlib.Path]) -> None:
    """The first token is out as soon as the connector reports it (it was sampled where the prompt was computed);
    the second waits for the KV. A load that then fails is prefilled here with its first token as given: the
    tokens are still exact."""
    engine, conn = make(hold=False)
    prompt = random_prompts(1, [40], 512, seed=7)[0]
    want = hf_greedy(models["llama"], prompt, 4)
    assert engine.add_request("r", prompt, GREEDY, kv_source="src") == 3
    conn.next.first_tokens.append(LoadDone("r", want[0]))
    outs = [o for o in engine.step() if o.request_id == "r"]
    assert [o.new_token_ids for o in outs] == [[want[0]]] and not outs[0].finished
    assert [o for o in engine.step() if o.request_id == "r"] == []  # waits for its KV
    conn.next.failed.append(LoadFailed("r", RuntimeError("peer gone"), settled=True))
    done = run_to_completion(engine)
    assert done["r"] == want  # the rest computed here, over the prompt and the first token as given


def test_first_token_that_ends_the_request_stops_its_load(make) -> None:
    engine, conn = make(hold=False)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request("done", list(range(3, 40)), one, kv_source="src")  # 3 blocks
    engine.add_request("stuck", list(range(50, 70)), one, kv_source="src")  # 2 blocks, a read still in flight
    conn.in_flight.add("stuck")
    conn.next.first_tokens += [LoadDone("done", 7), LoadDone("stuck", 8)]
    outs = {o.request_id: (o.token_ids, o.finish_reason) for o in engine.step()}
    assert outs == {"done": ([7], "length"), "stuck": ([8], "length")}
    assert engine.remote is not None and list(engine.remote.quarantined) == ["stuck"] and not engine.remote.loading
    assert engine.kv.stats().num_used == 2
    conn.next.settled.append("stuck")
    engine.step()


def test_first_token_that_ends_the_request_in_the_same_poll_as_its_load_result(make) -> None:
    """One poll reports a request's first token and its load done (or failed): the first token ends it (one token
    asked), so the load's result finds it gone and is dropped; its blocks were freed once. A holder that answers
    the release at once (off its step loop) makes this common; the engine loop died of it (a KeyError) before."""
    engine, conn = make(hold=False)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request("loaded", list(range(3, 40)), one, kv_source="src")
    engine.add_request("failed", list(range(50, 70)), one, kv_source="src")
    conn.next.first_tokens += [LoadDone("loaded", 7), LoadDone("failed", 8)]
    conn.next.loaded.append(LoadDone("loaded", 7))
    conn.next.failed.append(LoadFailed("failed", RuntimeError("peer gone"), settled=True))
    outs = {o.request_id: (o.token_ids, o.finish_reason) for o in engine.step()}
    assert outs == {"loaded": ([7], "length"), "failed": ([8], "length")}
    assert engine.remote is not None and not engine.remote.loading and not engine.remote.quarantined
    assert engine.kv.stats().num_used == 0 and not engine.has_unfinished_requests()


def test_failed_load_prefills_locally_and_quarantines_unsettled_blocks(make, models: dict[str, pathlib.Path]) -> None:
    engine, conn = make(hold=False)
    prompt = random_prompts(1, [40], 512, seed=6)[0]
    assert engine.add_request("r", prompt, GREEDY, kv_source="src") == 3
    assert conn.loads["r"] == ([0, 1, 2], 0)
    conn.next.failed.append(LoadFailed("r", RuntimeError("peer gone"), settled=False))
    engine.step()  # the failure is applied, and the same step prefills the prompt here
    assert engine.remote is not None and engine.remote.quarantined == {"r": [0, 1, 2]}
    assert engine.metrics.snapshot().counters["kv_load_fallbacks"] == 1
    done = run_to_completion(engine)
    assert done["r"] == hf_greedy(models["llama"], prompt, 4)  # computed here, in fresh blocks
    assert engine.kv.stats().num_used == 3  # the quarantined ones: a read may still write into them
    conn.next.settled.append("r")
    engine.step()
    assert engine.kv.stats().num_used == 0


def test_cancelled_load_frees_or_quarantines(make) -> None:
    engine, conn = make(hold=False)
    engine.add_request("settled", list(range(3, 20)), GREEDY, kv_source="src")
    engine.add_request("inflight", list(range(30, 50)), GREEDY, kv_source="src")
    conn.in_flight.add("inflight")
    engine.abort_request("settled")
    engine.abort_request("inflight")
    outs = {o.request_id: o.finish_reason for o in engine.step()}
    assert outs == {"settled": "abort", "inflight": "abort"}
    assert engine.remote is not None and list(engine.remote.quarantined) == ["inflight"]
    conn.next.settled.append("inflight")
    engine.step()


def test_refused_source_leaves_nothing_behind(make) -> None:
    engine, conn = make(hold=False)
    with pytest.raises(ValueError, match="refused"):
        engine.add_request("x", list(range(3, 20)), GREEDY, kv_source="refuse")
    engine.step()
    assert "x" not in engine.requests and not conn.loads


def test_a_load_without_room_waits_for_it_by_class_then_arrival(make) -> None:
    engine, conn = make(hold=False)
    batch = dataclasses.replace(GREEDY, priority=Priority.BATCH)
    assert engine.add_request("y", list(range(3, 255)), GREEDY, kv_source="src") == 16  # the whole cache
    assert engine.add_request("z", list(range(3, 100)), batch, kv_source="src") == 0  # 7 blocks: it waits
    assert engine.add_request("w", list(range(3, 40)), batch, kv_source="src") == 0  # behind z, same class
    assert engine.add_request("i", list(range(60, 70)), GREEDY, kv_source="src") == 0  # interactive: ahead of z
    assert engine.remote is not None
    assert [r.request_id for r, _ in engine.remote.pending] == ["i", "z", "w"]
    assert sorted(conn.loads) == ["y"] and engine.metrics.snapshot().counters["kv_loads_queued"] == 3
    engine.step()  # nothing freed: nothing starts
    assert sorted(conn.loads) == ["y"]
    engine.abort_request("w")  # a waiting load is forgotten: no block, no connector call
    engine.abort_request("y")  # its 16 blocks come back
    outs = {o.request_id: o.finish_reason for o in engine.step()}
    assert outs == {"w": "abort", "y": "abort"}
    assert conn.loads["i"] == ([15], 0) and conn.loads["z"] == ([14, 13, 12, 11, 10, 9, 8], 0)
    assert not engine.remote.pending and "w" not in conn.loads
    conn.next.loaded += [LoadDone("i", 7), LoadDone("z", 7)]
    assert {o.request_id for o in run_to_completion_outputs(engine)} == {"i", "z"}


def test_a_waiting_load_keeps_a_block_free_for_each_running_request(make) -> None:
    engine, conn = make(hold=False)
    engine.add_request("run", list(range(3, 20)), GREEDY)  # local: 2 blocks, then running
    engine.step()
    assert len(engine.scheduler.running) == 1
    # 14 blocks free: a 14-block prompt would leave none for the running request's next token
    assert engine.add_request("big", list(range(20, 20 + 14 * 16)), GREEDY, kv_source="src") == 0
    assert "big" not in conn.loads
    while engine.scheduler.running:
        engine.step()
    engine.step()  # "run" finished and freed its blocks: the load starts
    assert len(conn.loads["big"][0]) == 14
    engine.abort_request("big")
    engine.step()


def run_to_completion_outputs(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    return outs


class ReadyRecorder(ScriptedConnector):
    """Also records what the engine passes on of a load's source (the router's word on its prefill)."""

    def __init__(self, hold: bool) -> None:
        super().__init__(hold)
        self.ready: list[tuple[str, Any]] = []
        self.lost: list[str] = []

    def source_ready(self, request_id: str, source: Any) -> None:
        self.ready.append((request_id, source))

    def source_lost(self, request_id: str) -> None:
        self.lost.append(request_id)


def test_the_router_s_word_on_a_waiting_load_is_kept_or_ends_the_wait(make, models: dict[str, pathlib.Path]) -> None:
    engine, _ = make(hold=False)
    assert engine.remote is not None
    conn = engine.remote.connector = ReadyRecorder(hold=False)
    assert engine.add_request("y", list(range(3, 255)), GREEDY, kv_source="src") == 16  # the whole cache
    lost_prompt = random_prompts(1, [40], 512, seed=8)[0]
    assert engine.add_request("z", list(range(3, 100)), GREEDY, kv_source="stream-z") == 0  # waits for room
    assert engine.add_request("w", lost_prompt, GREEDY, kv_source="stream-w") == 0
    # a started load: both words go to the connector
    engine.kv_source_ready("y", "handoff-y")
    engine.kv_source_lost("y")
    assert conn.ready == [("y", "handoff-y")] and conn.lost == ["y"]
    # a waiting load's hand-off is kept for its start (NOTE: the connector knows no such load yet)
    engine.kv_source_ready("z", "handoff-z")
    assert conn.ready == [("y", "handoff-y")] and engine.remote.handoffs == {"z": "handoff-z"}
    # a waiting load whose prefill failed stops waiting: prefilled here at once, counted, no connector call
    engine.kv_source_lost("w")
    assert conn.lost == ["y"] and [r.request_id for r, _ in engine.remote.pending] == ["z"]
    assert engine.metrics.snapshot().counters["kv_load_fallbacks_PrefillLost"] == 1
    assert engine.requests["w"].kv_load_failed
    engine.abort_request("y")  # its 16 blocks come back: z's load starts, with its hand-off
    engine.step()
    assert conn.loads["z"] == ([15, 14, 13, 12, 11, 10, 9], 0)
    assert conn.ready == [("y", "handoff-y"), ("z", "handoff-z")] and not engine.remote.handoffs
    conn.next.loaded.append(LoadDone("z", 7))
    done = run_to_completion(engine)
    assert done["w"] == hf_greedy(models["llama"], lost_prompt, 4)  # prefilled here, while z waited
    assert len(done["z"]) == 4


def test_a_failed_prefill_told_before_its_request_came_is_kept_for_it(make, models: dict[str, pathlib.Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray may run an async actor's calls out of order, so the router's word that a request's prefill failed can
    come before the request: the request is then prefilled here at once, counted. A finished prefill's hand-off
    that comes first is not kept (it goes to the connector, which has no load of it). Kept words expire
    (NOTE_TTL_S) and are bounded (MAX_NOTES)."""
    from engine import expiring_ids

    engine, _ = make(hold=False)
    assert engine.remote is not None
    conn = engine.remote.connector = ReadyRecorder(hold=False)
    lost_prompt = random_prompts(1, [40], 512, seed=9)[0]
    engine.kv_source_lost("a")
    engine.kv_source_ready("b", "handoff-b")
    assert conn.lost == ["a"] and conn.ready == [("b", "handoff-b")]  # NOTE: the connector counts words on no pull
    assert engine.remote.lost_early.keys() == ["a"]
    assert engine.add_request("a", lost_prompt, GREEDY, kv_source="stream-a") == 0
    assert "a" not in conn.loads and engine.requests["a"].kv_load_failed
    assert engine.add_request("b", list(range(3, 100)), GREEDY, kv_source="stream-b") == 7
    assert conn.loads["b"] == ([0, 1, 2, 3, 4, 5, 6], 0) and conn.ready == [("b", "handoff-b")]  # not again
    counters = engine.metrics.snapshot().counters
    assert counters["kv_lost_before_request"] == 1 and counters["kv_load_fallbacks_PrefillLost"] == 1
    assert not engine.remote.lost_early and not engine.remote.handoffs
    conn.next.loaded.append(LoadDone("b", 7))
    done = run_to_completion(engine)
    assert done["a"] == hf_greedy(models["llama"], lost_prompt, 4) and len(done["b"]) == 4
    # a word past its time is not applied: the load starts as usual
    engine.kv_source_lost("c")
    monkeypatch.setattr(expiring_ids, "NOTE_TTL_S", -1.0)
    assert engine.add_request("c", list(range(200, 217)), GREEDY, kv_source="stream-c") == 2
    assert "c" in conn.loads and not engine.requests["c"].kv_load_failed
    assert engine.metrics.snapshot().counters["kv_lost_before_request"] == 1
    engine.abort_request("c")
    engine.step()
    # words on requests that never come (or came and ended) are bounded: the oldest go first
    monkeypatch.setattr(expiring_ids, "NOTE_TTL_S", 60.0)
    monkeypatch.setattr(expiring_ids, "MAX_NOTES", 3)
    for rid in ("d", "e", "f", "g"):
        engine.kv_source_lost(rid)
    assert engine.remote.lost_early.keys() == ["e", "f", "g"]
    engine.kv_source_lost("e")  # told twice: counts from the second time
    assert engine.remote.lost_early.keys() == ["f", "g", "e"]
    monkeypatch.setattr(expiring_ids, "NOTE_TTL_S", -1.0)
    engine.kv_source_lost("h")  # every older word has expired now
    assert engine.remote.lost_early.keys() == ["h"]
