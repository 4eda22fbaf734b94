"""Write a checkpoint directory of a named shape with no weights (for `load_format="dummy"`)."""

from __future__ import annotations

import json
from pathlib import Path

SHAPES: dict[str, dict[str, object]] = {
    # Llama-3-8B's real shape: the benchmark and GPU runs use it with dummy weights.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                      bos_token_id=128000, eos_token_id=128001, dtype="bfloat16"),
    # Llama-3-70B's real shape (issue 22: two instances of TP 2 on four H200s; 141 GB of bf16 weights).
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       bos_token_id=128000, eos_token_id=128001, dtype="bfloat16"),
    # A small Llama-shaped model that runs at interactive speed on a 2-core CPU.
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048, bos_token_id=1,
                  eos_token_id=2, dtype="float32"),
}


def write_dummy_model(out_dir: str | Path, shape: str = "small") -> Path:
    """Write config.json for `shape` into out_dir (no weights, no tokenizer) and return the directory."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {sorted(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **SHAPES[shape]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
