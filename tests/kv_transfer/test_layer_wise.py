"""Layer-wise KV streaming over real NIXL: a prefill worker in another process tells the decode engine (this
process) its blocks when the prompt's last chunk is scheduled and each layer group as it is written; the decode side
reads each group while the later layers compute. Token-exact against transformers over several prompt lengths and
TP 1 -> 2 and 2 -> 1, and an abort in the middle of the layers leaks no block on either side."""

from __future__ import annotations

import base64
import pathlib
import time

import pytest

from engine import LLMEngine
from kv_transfer.handle import KVReader, StreamedKV
from tests.conftest import assert_all_free
from tests.kv_transfer.conftest import NEW, connector, greedy, settle
from tests.kv_transfer.prefill_process import PrefillProcess
from tests.model_factory import hf_greedy, make_tiny_model, random_prompts

LAYERS = 4  # with kv_layer_groups 4: one layer per group, so three groups are announced before the first token


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("lw") / "llama4", "llama", seed=11, num_hidden_layers=LAYERS)


def stream(prefill: PrefillProcess, engine: LLMEngine, rid: str, prompt: list[int], n: int = NEW) -> None:
    """Start the prompt on the prefill worker, streaming to `engine`, and queue it on `engine` as a streamed load."""
    agents = prefill.call("agents")
    assert prefill.call("stream", rid, prompt, connector(engine).reader) == "ok"
    engine.add_request(rid, prompt, greedy(n), kv_source=StreamedKV("prefill", rid, len(prompt), agents))


def run(engine: LLMEngine, rid: str, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.token_ids
        time.sleep(0.0005)  # NOTE: 2 cores: leave the prefill process room while waiting for its progress
    raise AssertionError(f"request {rid} did not finish")


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 1), (1, 2), (2, 1)])
def test_layer_wise_streaming_is_token_exact(model: pathlib.Path, prefill_factory, consumer_factory,
                                             prefill_tp: int, decode_tp: int) -> None:
    prefill = prefill_factory(model, tensor_parallel_size=prefill_tp)
    engine = consumer_factory(model, tensor_parallel_size=decode_tp)
    lengths = [5, 16, 47, 130]
    for i, n in enumerate(lengths):
        prompt = random_prompts(1, [n], 512, seed=300 + i)[0]
        stream(prefill, engine, f"s{i}", prompt)
        assert run(engine, f"s{i}") == hf_greedy(model, prompt, NEW), f"length {n}"
        handle = prefill.call("result", f"s{i}", 30)
        assert handle is not None and handle != "not finished"
    counters = connector(engine).counters
    assert counters["fallbacks"] == 0 and counters["streamed"] == counters["transfers"] == len(lengths)
    # every prompt: its blocks, 3 group messages during the forward, the last with its first token
    assert counters["stream_messages"] == (LAYERS - 1 + 1) * len(lengths)
    blocks = sum(-(-n // 16) for n in lengths)
    sources = 2 if prefill_tp > decode_tp else 1  # TP 2 -> 1: each group of a block is read from both ranks
    # each group is read on its own: its blocks coalesce into one run per request and source rank at equal TP; at
    # unequal TP a piece is half a block on one side (1 -> 2: a decode rank's one head of the two; 2 -> 1: a
    # prefill rank's), so each block is a descriptor of its own
    per_block = decode_tp != prefill_tp
    want = (blocks if per_block else len(lengths)) * LAYERS * sources * decode_tp
    assert counters["descriptors"] == want
    assert prefill.call("wait_released", 10) == 0
    stats = prefill.call("stats")
    assert stats["used"] == 0
    # the holder's notifier counts into its producer's counters (published with its heartbeats): every progress
    # message the reader counted and each prompt's block list were sent once, none failed
    sent = stats["counters"]
    assert (sent["streams"], sent["stream_messages_sent"], sent["stream_send_failures"]) == \
        (len(lengths), counters["stream_messages"] + len(lengths), 0)


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 2), (2, 1)])
def test_abort_in_the_middle_of_the_layers_leaks_nothing(model: pathlib.Path, prefill_factory, consumer_factory,
                                                         prefill_tp: int, decode_tp: int) -> None:
    """The decode side gives up while the prefill is between layer groups (its layers slowed to 0.3 s each): its
    posted reads settle and its blocks are freed; the prefill side frees the prompt's blocks once its forward ends
    (the reader's release is served at its next step), and the next streamed request on both is token-exact."""
    prefill = prefill_factory(model, tensor_parallel_size=prefill_tp)
    engine = consumer_factory(model, tensor_parallel_size=decode_tp)
    prompt = random_prompts(1, [100], 512, seed=350)[0]
    assert prefill.call("slow_layers", 0.3) == "ok"
    stream(prefill, engine, "a", prompt)
    pull = connector(engine).pulls["a"]
    deadline = time.monotonic() + 30
    while not (pull.posted >= 1 and pull.first_token < 0) and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.001)
    assert pull.posted >= 1 and pull.groups_done < LAYERS and pull.first_token < 0, "not caught between groups"
    engine.abort_request("a")
    outs = [o for o in engine.step() if o.request_id == "a"]
    assert outs and outs[0].finished and outs[0].finish_reason == "abort"
    settle(engine)
    assert_all_free(engine)
    assert prefill.call("result", "a", 30) != "not finished"
    assert prefill.call("wait_released", 10) == 0
    stats = prefill.call("stats")
    assert stats["used"] == 0 and stats["held"] == 0 and stats["streams"] == 0 and stats["abandoned"] == 0
    # NOTE: the release is served at the holder's next step: after the prompt finished (released), or, with async
    # scheduling (a GPU), before its first token is read back (the stream is dropped, nothing held)
    counters = stats["counters"]
    assert counters.get("released", 0) + counters.get("streams_abandoned", 0) == 1
    assert counters.get("lease_expired", 0) == 0
    assert connector(engine).counters["cancelled"] == 1
    # both sides serve the next streamed request exactly
    assert prefill.call("slow_layers", 0.0) == "ok"
    nxt = random_prompts(1, [40], 512, seed=351)[0]
    stream(prefill, engine, "b", nxt)
    assert run(engine, "b") == hf_greedy(model, nxt, NEW)
    assert prefill.call("wait_released", 10) == 0


def test_abort_on_the_prefill_side_makes_the_reader_prefill_locally(model: pathlib.Path, prefill_factory,
                                                                     consumer_factory) -> None:
    """The prefill instance drops the request before its last chunk (chunked prefill, slowed layers): the reader is
    told (StreamProgress aborted), falls back to computing the prompt itself (logged and counted), and is still
    token-exact."""
    prefill = prefill_factory(model, max_num_batched_tokens=64, max_model_len=512)
    engine = consumer_factory(model)
    prompt = random_prompts(1, [200], 512, seed=360)[0]
    assert prefill.call("slow_layers", 0.1) == "ok"
    stream(prefill, engine, "p", prompt)
    time.sleep(0.5)  # inside its first chunks
    assert prefill.call("abort", "p") == "ok"
    assert run(engine, "p") == hf_greedy(model, prompt, NEW)
    counters = connector(engine).counters
    assert counters["fallbacks"] == 1 and counters["fallback_released"] == 1
    assert prefill.call("stats")["counters"]["streams_aborted"] == 1
    assert prefill.call("stats")["used"] == 0


def test_reader_that_gives_up_before_the_last_chunk_frees_the_prompt_at_once(model: pathlib.Path, prefill_factory,
                                                                           consumer_factory) -> None:
    """The decode side aborts while the prefill instance is still in the prompt's first chunks: the holder drops
    the stream, and when the prompt is done it holds nothing (no lease to wait out)."""
    prefill = prefill_factory(model, max_num_batched_tokens=64, max_model_len=512)
    engine = consumer_factory(model)
    # NOTE: one request first, so that both agents are connected: a CPU driver agent progresses (and so completes
    # a connection handshake) only at its step boundaries, which the slowed layers below space 0.4 s apart
    warm = random_prompts(1, [30], 512, seed=369)[0]
    stream(prefill, engine, "w", warm)
    assert run(engine, "w") == hf_greedy(model, warm, NEW)
    assert prefill.call("wait_released", 10) == 0
    prompt = random_prompts(1, [200], 512, seed=370)[0]
    assert prefill.call("slow_layers", 0.1) == "ok"
    stream(prefill, engine, "g", prompt)
    time.sleep(0.3)
    engine.abort_request("g")
    settle(engine)  # the release goes out
    assert_all_free(engine)
    assert prefill.call("result", "g", 30) is None  # nothing handed off: its reader is gone
    stats = prefill.call("stats")
    assert stats["used"] == 0 and stats["held"] == 0 and stats["streams"] == 0 and stats["abandoned"] == 0
    assert stats["counters"]["streams_abandoned"] == 1


def test_stream_whose_messages_never_come_completes_by_the_hand_off(model: pathlib.Path, prefill_factory,
                                                                    consumer_factory) -> None:
    """The holder's stream messages are lost (here: it was told a reader it cannot reach); once the prefill is done
    its router passes the hand-off on (`kv_source_ready`) and the pull completes from it, exactly."""
    prefill = prefill_factory(model)
    engine = consumer_factory(model)
    prompt = random_prompts(1, [70], 512, seed=380)[0]
    agents = prefill.call("agents")
    lost = KVReader("nobody-tp0", base64.b64encode(b"not NIXL metadata").decode())
    assert prefill.call("stream", "h", prompt, lost) == "ok"
    engine.add_request("h", prompt, greedy(), kv_source=StreamedKV("prefill", "h", len(prompt), agents))
    handle = prefill.call("result", "h", 30)
    assert handle is not None and handle != "not finished"
    for _ in range(20):  # nothing comes the stream's way
        assert [o for o in engine.step() if o.request_id == "h"] == []
    engine.kv_source_ready("h", handle)
    assert run(engine, "h") == hf_greedy(model, prompt, NEW)
    counters = connector(engine).counters
    assert counters["streams_completed_by_handle"] == 1 and counters["fallbacks"] == 0
    assert prefill.call("wait_released", 10) == 0
