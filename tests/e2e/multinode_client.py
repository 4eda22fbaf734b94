"""The client of tests/e2e/test_multinode.py, run inside node A's namespace (the router and Redis listen there):
sends greedy requests, reads the registry, and prints one JSON line.

    python -m tests.e2e.multinode_client TARGET REDIS_URL PROMPTS_JSON MAX_TOKENS
"""

from __future__ import annotations

import json
import sys

import grpc

from api.v1 import pdserve_pb2 as pb
from api.v1 import pdserve_pb2_grpc as pb_grpc
from metastore import MetadataStore


def main(target: str, redis_url: str, prompts: list[list[int]], max_tokens: int) -> None:
    outputs, routing = [], []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PDServeStub(channel)
        for prompt in prompts:
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            out = list(stub.Generate(req, timeout=120))
            outputs.append([t for r in out for t in r.token_ids])
            routing.append({"disaggregated": out[-1].routing.disaggregated,
                            "transferred_blocks": out[-1].routing.transferred_blocks})
    instances = [{"id": i.instance_id, "role": i.role, "node_ip": i.node_ip}
                 for i in MetadataStore(redis_url).live_instances()]
    print(json.dumps({"outputs": outputs, "routing": routing, "instances": instances}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
