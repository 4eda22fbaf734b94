"""A prefill worker in its own process (real NIXL between processes), driven by the test over a pipe."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve(conn: Connection, model: str, engine_kwargs: dict[str, Any], cfg_kwargs: dict[str, Any]) -> None:
    import torch

    from engine import EngineConfig, LLMEngine, SamplingParams
    from kv_transfer import KVProducer, NixlConnectorSpec, TransferConfig
    from kv_transfer.handle import KVEndpoint, KVReader

    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(model=model, **engine_kwargs),
                       NixlConnectorSpec("prefill", "prefill", TransferConfig(**cfg_kwargs)))
    assert engine.remote is not None
    producer = engine.remote.connector
    assert isinstance(producer, KVProducer)
    conn.send("ready")
    finished: dict[str, Any] = {}  # streamed request id -> its KVHandle (None: not held), once done
    while True:
        if not conn.poll(0.002):
            for out in engine.step():  # serves release messages, expires leases, computes streamed prompts
                if out.finished:
                    finished[out.request_id] = out.kv_handoff
            continue
        cmd, *args = conn.recv()
        if cmd == "exit":
            engine.shutdown()
            conn.send("bye")
            return
        if cmd == "prefill":  # the prefill role: one token, the blocks held for a reader
            rid, prompt = args
            engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
            handle = None
            while handle is None:
                for out in engine.step():
                    if out.request_id == rid:
                        assert out.finished
                        handle = out.kv_handoff
            conn.send(handle)
        elif cmd == "stream":  # layer-wise: the prompt's KV progress goes to `reader` while it computes
            rid, prompt, reader = args
            engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                               kv_reader=reader)
            conn.send("ok")
        elif cmd == "result":  # a streamed request's KVHandle once it is done
            rid, timeout = args
            deadline = time.monotonic() + timeout
            while rid not in finished and time.monotonic() < deadline:
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out.kv_handoff
            conn.send(finished.pop(rid, "not finished"))
        elif cmd == "agents":
            conn.send(producer.descriptors)
        elif cmd == "endpoint":  # as InstanceWorker.kv_endpoint gives it
            agent = engine.kv_ranks.local
            conn.send(KVEndpoint("prefill", list(producer.descriptors),
                                 KVReader(agent.name, agent.partial_metadata_b64())))
        elif cmd == "meet":
            conn.send(engine.meet_kv_peers(args[0]))
        elif cmd == "slow_layers":  # each decoder layer sleeps this long first: a prefill slow enough to catch
            delay = args[0]  # between layer groups (the forward itself is unchanged)
            for layer in engine.executor.runner.model.layers:
                forward = layer.forward
                layer.forward = lambda *a, _f=forward, _d=delay, **k: (time.sleep(_d), _f(*a, **k))[1]
            conn.send("ok")
        elif cmd == "abort":
            engine.abort_request(args[0])
            conn.send("ok")
        elif cmd == "stats":
            stats = engine.stats()
            conn.send({"used": stats.kv.num_used, "held": stats.num_held, "leases": len(producer.leases),
                       "streams": len(producer.streams), "abandoned": len(producer.abandoned),
                       "counters": dict(producer.counters)})
        elif cmd == "wait_released":
            deadline = time.monotonic() + args[0]
            while engine.stats().num_held and time.monotonic() < deadline:
                engine.step()
                time.sleep(0.002)
            conn.send(engine.stats().num_held)


class PrefillProcess:
    def __init__(self, model: str, engine_kwargs: dict[str, Any] | None = None,
                 cfg_kwargs: dict[str, Any] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        # NOTE: not a daemon: a TP>1 prefill engine spawns its own rank processes.
        self.proc = ctx.Process(target=_serve, args=(child, model, engine_kwargs or {"dtype": "float32"},
                                                     cfg_kwargs or {}))
        self.proc.start()
        if not self.conn.poll(120):
            raise TimeoutError("prefill process did not start")
        assert self.conn.recv() == "ready"

    def call(self, *cmd: Any, timeout: float = 60) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"prefill process did not answer {cmd[0]}")
        return self.conn.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=30)
            except (TimeoutError, BrokenPipeError, EOFError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
