"""Model configuration read from a Hugging Face checkpoint directory's config.json.

Only the fields the engine understands are accepted; anything that would change the model's math in a way
we do not implement (another architecture, activation, rope type, sliding window, MLP bias) is refused with a
ValueError that names the config field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("float32", "bfloat16", "float16") to a torch dtype, with a clear error otherwise."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; use one of float32, bfloat16, float16")
        return name
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use one of float32, bfloat16, float16 (or 'auto')")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / `rope_scaling` + `rope_theta`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only Llama-family model; hashable so it can fingerprint a KV layout."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope: RopeConfig
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @staticmethod
    def from_dir(model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"model directory {model_dir} has no config.json")
        with open(path) as f:
            raw = json.load(f)
        cfg = ModelConfig.from_dict(raw)
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.is_file():
            with open(gen_path) as f:
                gen = json.load(f)
            eos = _as_id_tuple(gen.get("eos_token_id"))
            if eos:
                cfg = replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + eos)))
        return cfg

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            model_type = raw.get("model_type", "")
            archs = {
                "llama": ["LlamaForCausalLM"],
                "qwen2": ["Qwen2ForCausalLM"],
                "mistral": ["MistralForCausalLM"],
            }.get(model_type, [])
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model architecture {archs or raw.get('model_type')!r} (config field "
                f"'architectures'); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        arch = archs[0]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported config field hidden_act={act!r}; only 'silu' is implemented")
        if raw.get("mlp_bias"):
            raise ValueError("unsupported config field mlp_bias=true; only bias-free MLPs are implemented")
        max_pos = int(raw.get("max_position_embeddings", 2048))
        if arch == "Qwen2ForCausalLM" and raw.get("use_sliding_window"):
            raise ValueError("unsupported config field use_sliding_window=true; sliding-window attention is "
                             "not implemented")
        # NOTE: full attention equals sliding-window attention while every sequence is shorter than the window,
        # so a Mistral window is accepted and `context_limit` caps max_model_len at it.
        window = raw.get("sliding_window")
        n_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = int(raw.get("head_dim") or hidden // n_heads)
        qkv_bias = arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=n_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rope=_parse_rope(raw),
            eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
            checkpoint_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            extra={"sliding_window": window if arch == "MistralForCausalLM" else None},
        )

    @property
    def context_limit(self) -> int:
        """The longest sequence this model serves: max_position_embeddings, capped at a (Mistral) sliding window.
        NOTE: full attention equals windowed attention only for sequences shorter than the window."""
        window = self.extra.get("sliding_window")
        return self.max_position_embeddings if window is None else min(self.max_position_embeddings, int(window))

    def resolve_max_model_len(self, requested: int | None) -> int:
        """`requested` checked against the context limit; None: the limit itself."""
        limit = self.context_limit
        if requested is None:
            requested = limit
        elif requested > limit:
            raise ValueError(
                f"max_model_len: {requested} exceeds the model's limit {limit} "
                "(max_position_embeddings, or sliding_window, which is not implemented beyond full attention)"
            )
        if requested < 2:
            raise ValueError(f"max_model_len: {requested} must be at least 2")
        return requested

    def resolve_dtype(self, requested: str) -> torch.dtype:
        """The compute dtype: the checkpoint's own for "auto", else `requested`."""
        return parse_dtype(self.checkpoint_dtype if requested == "auto" else requested)

    def hash_salt(self, dtype: str, cache_salt: str) -> str:
        """Salt of the prefix-cache block hashes: equal only for engines whose KV for equal tokens is equal
        (same model math, same dtype name, same user salt)."""
        return f"{self.fingerprint()}:{dtype}:{cache_salt}"

    def fingerprint(self) -> str:
        """A stable digest of everything that determines the KV cache's contents for given tokens."""
        key = json.dumps(
            [self.architecture, self.vocab_size, self.hidden_size, self.intermediate_size,
             self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads, self.head_dim,
             self.rms_norm_eps, self.qkv_bias, self.tie_word_embeddings, list(vars(self.rope).values())],
        )
        return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported config field rope_scaling.rope_type={rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
