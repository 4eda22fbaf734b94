"""ModelConfig from a checkpoint's config.json: unsupported fields named, the context limit (sliding window),
max_model_len and dtype resolution, and a hash salt that is stable and changes with what changes the KV."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

from engine import EngineConfig
from engine.model_config import ModelConfig, parse_dtype


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


def raw(**changes: object) -> dict[str, object]:
    """A minimal config.json of a tiny llama."""
    base: dict[str, object] = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
                               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "max_position_embeddings": 1024, "eos_token_id": 2}
    base.update(changes)
    return base


def test_context_limit_is_capped_by_a_mistral_window_only() -> None:
    assert ModelConfig.from_dict(raw()).context_limit == 1024
    mistral = raw(architectures=["MistralForCausalLM"], sliding_window=300)
    assert ModelConfig.from_dict(mistral).context_limit == 300
    assert ModelConfig.from_dict({**mistral, "sliding_window": 4096}).context_limit == 1024
    assert ModelConfig.from_dict({**mistral, "sliding_window": None}).context_limit == 1024
    assert ModelConfig.from_dict(raw(sliding_window=300)).context_limit == 1024  # a llama has no window


def test_resolve_max_model_len() -> None:
    mc = ModelConfig.from_dict(raw(architectures=["MistralForCausalLM"], sliding_window=300))
    assert mc.resolve_max_model_len(None) == 300 and mc.resolve_max_model_len(300) == 300
    assert mc.resolve_max_model_len(2) == 2
    with pytest.raises(ValueError, match=r"max_model_len: 301 exceeds the model's limit 300 \(max_position_emb"):
        mc.resolve_max_model_len(301)
    with pytest.raises(ValueError, match="max_model_len: 1 must be at least 2"):
        mc.resolve_max_model_len(1)


def test_resolve_dtype() -> None:
    mc = ModelConfig.from_dict(raw(torch_dtype="bfloat16"))
    assert mc.resolve_dtype("auto") is torch.bfloat16
    assert ModelConfig.from_dict(raw(dtype="float16", torch_dtype="bfloat16")).resolve_dtype("auto") is torch.float16
    assert ModelConfig.from_dict(raw()).resolve_dtype("auto") is torch.float32  # no dtype key: float32
    assert mc.resolve_dtype("half") is torch.float16 and mc.resolve_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match=r"unsupported dtype 'int8'; use one of float32, bfloat16, float16"):
        mc.resolve_dtype("int8")
    with pytest.raises(ValueError, match=r"unsupported dtype torch\.int8"):
        parse_dtype(torch.int8)


def test_hash_salt_is_stable_and_separates_what_changes_the_kv() -> None:
    mc = ModelConfig.from_dict(raw())
    # Pinned: engines of two versions (or on two machines) must agree, so the digest must not drift.
    assert mc.fingerprint() == "a22784c907369746"
    assert mc.hash_salt("float32", "") == "a22784c907369746:float32:"
    assert mc.hash_salt("bfloat16", "tenant") == "a22784c907369746:bfloat16:tenant"
    same = [raw(eos_token_id=[2, 9]), raw(max_position_embeddings=4096), raw(torch_dtype="bfloat16"),
            raw(bos_token_id=1)]
    assert {ModelConfig.from_dict(r).fingerprint() for r in same} == {mc.fingerprint()}
    other = [raw(vocab_size=513), raw(num_key_value_heads=4), raw(rms_norm_eps=1e-5), raw(rope_theta=500000.0),
             raw(tie_word_embeddings=True), raw(attention_bias=True),
             raw(architectures=["Qwen2ForCausalLM"])]
    prints = [ModelConfig.from_dict(r).fingerprint() for r in other]
    assert len(set(prints)) == len(other) and mc.fingerprint() not in prints


def test_generation_config_eos_ids_are_merged(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(raw()))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (2, 7)
    with pytest.raises(ValueError, match=r"has no config\.json"):
        ModelConfig.from_dir(tmp_path / "nope")


def test_qwen2_sliding_window_is_refused() -> None:
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        ModelConfig.from_dict(raw(architectures=["Qwen2ForCausalLM"], use_sliding_window=True))
