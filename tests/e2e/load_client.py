"""The load of tests/e2e/test_node_loss.py, run inside node A's namespace (where the router listens): a first wave
of greedy streams; once every one of them has tokens, it prints `STREAMING` and waits for a line on stdin (the
test kills a node in between), then sends a second wave at once and waits for everything. Prints one JSON line:
each request's tokens, final routing and error (null when it ended well), in order.

    python -m tests.e2e.load_client TARGET MAX_TOKENS WAVE1_PROMPTS_JSON WAVE2_PROMPTS_JSON
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import grpc

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc

FIRST_TOKENS = 4  # tokens every first-wave stream has before the node is killed


def main(target: str, max_tokens: int, wave1: list[list[int]], wave2: list[list[int]]) -> None:
    prompts = wave1 + wave2
    results: list[dict[str, Any]] = [{"tokens": [], "routing": None, "error": None} for _ in prompts]
    streaming = threading.Semaphore(0)

    def run(i: int, stub: pb_grpc.PDServeStub) -> None:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompts[i]), sampling=pb.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        told, out = False, results[i]
        try:
            for r in stub.Generate(req, timeout=150):
                out["tokens"] += list(r.token_ids)
                if not told and len(out["tokens"]) >= FIRST_TOKENS:
                    streaming.release()
                    told = True
                if r.finished:
                    g = r.routing
                    out["routing"] = {"decode": g.decode_instance, "prefill": g.prefill_instance,
                                      "disaggregated": g.disaggregated, "migrations": g.migrations,
                                      "reason": g.reason}
        except grpc.RpcError as e:
            out["error"] = f"{e.code().name}: {e.details()}"
        finally:
            if not told:
                streaming.release()

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PDServeStub(channel)
        threads = [threading.Thread(target=run, args=(i, stub)) for i in range(len(wave1))]
        for t in threads:
            t.start()
        for _ in wave1:
            streaming.acquire()
        print("STREAMING", flush=True)
        sys.stdin.readline()
        second = [threading.Thread(target=run, args=(len(wave1) + i, stub)) for i in range(len(wave2))]
        for t in second:
            t.start()
        for t in threads + second:
            t.join()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]))
