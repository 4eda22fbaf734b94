"""Bad input is refused with a clear ValueError and the engine keeps serving everything else."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from engine import LLM, EngineConfig, SamplingParams
from tests.conftest import assert_all_free, run_to_completion
from tests.model_factory import hf_greedy, random_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], GREEDY, "prompt is empty"),
        ([5, 512, 7], GREEDY, "outside the vocabulary"),
        ([5, -1], GREEDY, "outside the vocabulary"),
        (list(range(3, 259)), GREEDY, "max_model_len"),
        ([5, 6], None, "max_tokens"),
        ([5, 6], "neg_temp", "temperature"),
    ],
)
def test_bad_request_is_refused_while_others_continue(models: dict[str, pathlib.Path], engine_factory,
                                                      prompt: list[int], params: object, message: str) -> None:
    model = models["llama"]
    engine = engine_factory(model, max_model_len=256)
    good = random_prompts(2, [40, 9], 512, seed=40)
    engine.add_request("good0", good[0], GREEDY)
    engine.step()  # the good request is mid-flight when the bad one arrives
    with pytest.raises(ValueError, match=message):
        if params is None:
            engine.add_request("bad", prompt, SamplingParams(max_tokens=0))
        elif params == "neg_temp":
            engine.add_request("bad", prompt, SamplingParams(temperature=-0.5))
        else:
            engine.add_request("bad", prompt, params)  # type: ignore[arg-type]
    assert "bad" not in engine.requests
    engine.add_request("good1", good[1], GREEDY)
    done = run_to_completion(engine)
    assert done == {"good0": hf_greedy(model, good[0], 12), "good1": hf_greedy(model, good[1], 12)}


def test_generate_validates_all_prompts_before_queueing_any(models: dict[str, pathlib.Path]) -> None:
    with LLM(model=str(models["llama"]), dtype="float32") as llm:
        with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
            llm.generate([[5, 6, 7], []], GREEDY)
        assert not llm.engine.has_unfinished_requests()
        assert_all_free(llm.engine)
        assert llm.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"


def test_abort_at_any_time_frees_blocks(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"], max_num_batched_tokens=32)
    prompts = random_prompts(4, [100, 20, 60, 5], 512, seed=41)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    engine.abort_request("r3")  # waiting
    engine.step()
    engine.abort_request("r0")  # mid chunked prefill
    for _ in range(4):
        engine.step()
    engine.abort_request("r1")  # decoding
    engine.abort_request("nope")  # unknown ids are ignored
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["r2"].finish_reason == "length"
    assert engine.kv.stats().num_used == 0


def test_abort_reports_finish_reason_abort(models: dict[str, pathlib.Path], engine_factory) -> None:
    engine = engine_factory(models["llama"])
    engine.add_request("x", [5, 6, 7], GREEDY)
    engine.step()
    engine.abort_request("x")
    outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [("x", True, "abort")]


def _edited(src: pathlib.Path, dst: pathlib.Path, **changes: object) -> pathlib.Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "rope_type"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_config_field_is_named(models: dict[str, pathlib.Path], tmp_path: pathlib.Path,
                                           changes: dict[str, object], field: str) -> None:
    bad = _edited(models["llama"], tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=field):
        EngineConfig(model=str(bad))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 12}, "block_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_model_len": 4096}, "max_model_len"),
        ({"num_kv_blocks": 2}, "num_kv_blocks"),
        ({"load_format": "pickle"}, "load_format"),
    ],
)
def test_bad_engine_config_is_named(models: dict[str, pathlib.Path], kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(model=str(models["llama"]), **kwargs)  # type: ignore[arg-type]


def test_missing_weights_is_a_clear_error(models: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(models["llama"] / "config.json", bare / "config.json")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        LLM(model=str(bare))
