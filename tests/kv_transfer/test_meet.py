"""Instances introduced before their first request (KVConnector.meet, router/introductions.py), over real NIXL
between two processes: each side learns the other once (a second introduction is a no-op), the requests after
are token-exact with nothing counted as failed, and a peer whose metadata is garbage is logged and counted, never
raised, and the pair's requests still go through."""

from __future__ import annotations

import base64
import dataclasses
import pathlib
import time

import pytest
import torch

from engine import LLMEngine
from kv_transfer import TransferConfig
from kv_transfer.handle import KVEndpoint, KVHandle
from tests.kv_transfer.conftest import NEW, connector, decode
from tests.kv_transfer.prefill_process import PrefillProcess
from tests.kv_transfer.test_layer_wise import run, stream
from tests.model_factory import hf_greedy, make_tiny_model, random_prompts


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("meet") / "llama", "llama", seed=5)


def endpoint(engine: LLMEngine) -> KVEndpoint:
    c = connector(engine)
    return KVEndpoint("decode", list(c.ranks.descriptors), c.reader)


def wait_counted(prefill: PrefillProcess, name: str, n: int, timeout: float = 10) -> dict[str, int]:
    """The producer's counters once `name` reached n (its notifier and release thread count off the step loop)."""
    deadline = time.monotonic() + timeout
    while True:
        counters = prefill.call("stats")["counters"]
        if counters.get(name, 0) >= n or time.monotonic() > deadline:
            return counters
        time.sleep(0.05)


CASES = [pytest.param("cpu", None, False, id="cpu-nixl"), pytest.param("cpu", True, True, id="cpu-local-copy"),
         # NOTE: two processes on one GPU: the reader maps the holder's KV by its CUDA IPC handle (on by default)
         pytest.param("cuda", None, True, id="gpu-local-copy", marks=[
             pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize(("device", "local_copy", "mapped"), CASES)
def test_a_pair_met_ahead_serves_its_requests_token_exact(model: pathlib.Path, prefill_factory, consumer_factory,
                                                         device: str, local_copy: bool | None,
                                                         mapped: bool) -> None:
    # NOTE: a holder shares its KV only with local copies on
    prefill = prefill_factory(model, cfg_kwargs={"local_copy": local_copy}, device=device)
    engine = consumer_factory(model, TransferConfig(local_copy=local_copy), device=device)
    holder = prefill.call("endpoint")
    c = connector(engine)
    assert c.meet([holder]) == 1 and c.meet([holder]) == 0
    # rank 0 has a connection to the holder's rank-0 agent (where releases go) ahead of the first one, opened once:
    # by the read path's meet when it reads over NIXL, else for the releases alone (counted)
    assert holder.agents[0].agent_name in c.agent.connected
    assert c.counters["notify_connections"] == (1 if mapped else 0)
    # NOTE: rank 0 knows the holder's agent (releases), and read it ahead: mapped (local copy) or connected
    agent = c.agent
    name = holder.agents[0].agent_name
    assert name in agent.peers
    assert (agent.local_peers.peers.get(name) is not None) == mapped
    # a GPU peer with the same heads: its reads go straight to the copies (as after a first read)
    assert (name in agent.local_peers.direct) == (device == "cuda")
    assert prefill.call("meet", [endpoint(engine)]) == 1 and prefill.call("meet", [endpoint(engine)]) == 0
    counters = wait_counted(prefill, "notify_connections", 1)
    assert (counters["peers_met"], counters["meet_failures"], counters["notify_connections"]) == (1, 0, 1)
    assert c.meet([endpoint(engine)]) == 0  # an instance never meets itself
    # a streamed request and a handed-off one, each token-exact
    prompts = random_prompts(2, [37, 50], 512, seed=42)
    stream(prefill, engine, "s0", prompts[0])
    assert run(engine, "s0") == hf_greedy(model, prompts[0], NEW)
    handle = prefill.call("prefill", "h0", prompts[1])
    assert isinstance(handle, KVHandle)
    assert decode(engine, "h0", prompts[1], handle) == hf_greedy(model, prompts[1], NEW)
    assert (c.counters["fallbacks"], c.counters["meet_failures"], c.counters["peers_met"]) == (0, 0, 1)
    assert prefill.call("wait_released", 10) == 0
    sent = prefill.call("stats")["counters"]
    assert (sent["stream_send_failures"], sent["ack_send_failures"], sent["meet_failures"]) == (0, 0, 0)


def test_a_peer_with_garbage_metadata_is_counted_and_the_pair_still_serves(model: pathlib.Path, prefill_factory,
                                                                          consumer_factory) -> None:
    prefill = prefill_factory(model)
    engine = consumer_factory(model)
    holder = prefill.call("endpoint")
    c = connector(engine)
    junk = base64.b64encode(b"\x00\xffnot nixl metadata" * 8)
    bad_agent = dataclasses.replace(holder.agents[0], agent_name="bogus-tp0-1", agent_metadata=junk)
    bad_holder = dataclasses.replace(holder, engine_id="bogus", agents=[bad_agent])
    assert c.meet([bad_holder]) == 1  # tried (and logged): a new peer here, not one it could prepare
    assert c.counters["meet_failures"] >= 1
    bad_reader = dataclasses.replace(endpoint(engine), engine_id="bogus-decode",
                                     reader=dataclasses.replace(c.reader, agent_name="bogus-reader",
                                                                metadata_b64=junk.decode()))
    assert prefill.call("meet", [bad_reader]) == 1
    # the notifier and the release thread each fail on it, on their own threads
    assert wait_counted(prefill, "meet_failures", 2)["meet_failures"] == 2
    prompt = random_prompts(1, [40], 512, seed=7)[0]
    stream(prefill, engine, "s0", prompt)
    assert run(engine, "s0") == hf_greedy(model, prompt, NEW)
    assert c.counters["fallbacks"] == 0
    assert prefill.call("wait_released", 10) == 0
