"""`pdserve demo`: a local cluster (1 prefill + 1 decode instance on CPU, a small dummy-weights model) serving a
few requests that show local prefill, remote prefill with a KV transfer, and a prefix-cache hit."""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
from pathlib import Path

import grpc

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc
from pdserve.config import load_config
from pdserve.dummy_model import write_dummy_model
from pdserve.ready_line import ReadyLine
from pdserve.serve import serve

ROOT = Path(__file__).resolve().parents[1]


def _request(stub: pb_grpc.PDServeStub, tokens: list[int], max_tokens: int) -> tuple[list[int], pb.Routing, float,
                                                                                   float]:
    """Returns (tokens, routing, TTFT seconds, mean TPOT seconds) measured at the client."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=tokens),
                             sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    stamps: list[float] = []
    out: list[int] = []
    routing = pb.Routing()
    for response in stub.Generate(req, timeout=120):
        stamps += [time.perf_counter()] * len(response.token_ids)
        out += response.token_ids
        if response.finished:
            routing = response.routing
    ttft = stamps[0] - start
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return out, routing, ttft, tpot


def run(shape: str = "small", max_tokens: int = 16) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = write_dummy_model(tmp, shape)
        cfg = load_config(ROOT / "deploy/ray/serving-tiny-cpu.yaml",
                          {"engine.model": str(model), "engine.load_format": "dummy", "server.port": 0})
        print(f"pdserve demo: starting Redis, Ray, 1 prefill + 1 decode instance ({shape} model, dummy weights) "
              "and the gRPC router ...", flush=True)
        ready = threading.Event()
        target: list[str] = []
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()

        def on_ready(line: ReadyLine) -> None:
            target.extend([line.targets[0], line.metrics_urls[0]])
            ready.set()

        thread = threading.Thread(target=lambda: loop.run_until_complete(serve(cfg, stop, on_ready)), daemon=True)
        thread.start()
        while not ready.wait(0.5):
            if not thread.is_alive():
                print("pdserve demo: the cluster failed to start (see the log above)")
                return 1
        print(f"pdserve demo: router on {target[0]}, metrics on {target[1]}\n", flush=True)
        rng = random.Random(0)
        system = [rng.randrange(3, 4000) for _ in range(160)]  # a shared "system prompt"
        requests = [
            ("short prompt (prefilled on the decode instance)", [rng.randrange(3, 4000) for _ in range(20)]),
            ("long prompt (prefilled remotely, KV pulled over NIXL)", system + [rng.randrange(3, 4000)
                                                                                for _ in range(40)]),
            ("same system prompt, new question (prefix-cache hit)", system + [rng.randrange(3, 4000)
                                                                              for _ in range(12)]),
        ]
        try:
            with grpc.insecure_channel(target[0]) as channel:
                stub = pb_grpc.PDServeStub(channel)
                for title, tokens in requests:
                    out, r, ttft, tpot = _request(stub, tokens, max_tokens)
                    where = (f"prefill {r.prefill_instance} -> decode {r.decode_instance}, "
                             f"{r.transferred_blocks} KV blocks transferred" if r.disaggregated
                             else f"local prefill on {r.decode_instance}")
                    print(f"{title}\n  prompt {len(tokens)} tokens; {where}; cached {r.cached_tokens} tokens\n"
                          f"  placement: {r.reason}\n"
                          f"  TTFT {ttft * 1e3:.0f} ms, TPOT {tpot * 1e3:.1f} ms (this machine, CPU)\n"
                          f"  output {out}\n", flush=True)
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(120)
        print("pdserve demo: shut down cleanly")
    return 0
