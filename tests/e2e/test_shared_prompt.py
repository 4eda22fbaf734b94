"""An idle pool of four decode instances and one system prompt every conversation starts with: new
conversations spread over the pool, and each conversation's follow-up returns to the instance holding it
(router/shared_prefixes.py; real Ray, Redis, gRPC)."""

from __future__ import annotations

import pathlib
from collections import Counter

import pytest

from tests.e2e.serve_process import serve
from tests.model_factory import random_prompts

pytestmark = pytest.mark.slow


def test_conversations_sharing_a_system_block_spread_and_follow_ups_return(tmp_path: pathlib.Path,
                                                                           models: dict[str, pathlib.Path]) -> None:
    edits = {"pools": {"prefill": {"replicas": 0}, "decode": {"replicas": 4}}}
    system = random_prompts(1, [16], 512, seed=1500)[0]  # one full block
    with serve(tmp_path, models["llama"], edits) as server:
        assert len(server.store.live_instances("decode")) == 4
        conversations = [system + random_prompts(1, [56], 512, seed=1600 + c)[0] for c in range(16)]  # 4.5 blocks
        homes = []
        for prompt in conversations:  # one after another, on an idle pool
            final = server.generate(prompt, max_tokens=4)[-1]
            homes.append(final.routing.decode_instance)
        spread = Counter(homes)
        assert len(spread) >= 3, spread
        for c, prompt in enumerate(conversations):  # a follow-up shares its conversation's first 4 blocks
            follow_up = prompt[:64] + random_prompts(1, [20], 512, seed=1700 + c)[0]
            final = server.generate(follow_up, max_tokens=4)[-1]
            assert final.routing.decode_instance == homes[c], (c, final.routing)
            assert final.routing.cached_tokens == 64, (c, final.routing)
        server.wait_idle()
