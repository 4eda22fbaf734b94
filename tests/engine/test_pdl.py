"""Programmatic dependent launch (engine/pdl.py) changes no greedy token (GPU only)."""

from __future__ import annotations

import pathlib

import pytest

from engine import LLM, SamplingParams
from tests.model_factory import random_prompts


@pytest.mark.gpu
def test_programmatic_dependent_launch_changes_no_token(models: dict[str, pathlib.Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 with graphs, the Triton kernels launched with PDL (engine/pdl.py) against launched without: the
    same kernels doing the same arithmetic, so greedy tokens must agree exactly. A kernel that read its input
    before `gdc_wait` would race its predecessor on these tiny, short kernels."""
    from engine import pdl

    if not pdl.enabled():
        pytest.skip("PDL is off on this GPU / Triton (see the log line of engine/pdl.py)")
    model = models["llama"]
    prompts = random_prompts(12, [3 + 17 * i for i in range(12)], 512, seed=305)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = {}
    for on in (True, False):
        monkeypatch.setitem(pdl._state, "on", on)
        with LLM(model=str(model), dtype="bfloat16", device="cuda", max_num_seqs=16) as llm:
            runs[on] = [o.token_ids for o in llm.generate(prompts, params)]
            assert llm.engine.executor.runner.graphs.replays > 0
    assert runs[True] == runs[False]
