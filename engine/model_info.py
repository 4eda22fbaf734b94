"""The facts about a served model that a caller outside the engine needs: the router's view of the model.

    ModelInfo.load(model_dir, ...)   reads config.json (and generation_config.json) only: no weights, no device
    ModelInfo.from_config(cfg)       the engine's own facts, from its EngineConfig

Both go through `_build` and ModelConfig's shared rules (context limit, dtype, hash salt), so a router and the
engines it routes to agree on block hashes and limits when they are given the same settings. `validate_prompt`
is the one prompt check: the engine runs it on every request and the router runs it before placing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.model_config import ModelConfig, dtype_name

if TYPE_CHECKING:
    from engine.config import EngineConfig


@dataclass(frozen=True)
class ModelInfo:
    model: str  # the model directory
    vocab_size: int
    max_model_len: int  # prompt + generated tokens of one sequence
    block_size: int  # tokens per KV block (and per prefix-cache hash)
    hash_salt: str  # salt of the prefix-cache block hashes (ModelConfig.hash_salt)
    eos_token_ids: tuple[int, ...]
    dtype: str  # the compute dtype's name, e.g. "bfloat16"

    @staticmethod
    def load(model: str, *, dtype: str = "auto", block_size: int = 16, max_model_len: int | None = None,
             cache_salt: str = "") -> ModelInfo:
        """Read from the model directory; the arguments mean what EngineConfig's fields of the same name do."""
        mc = ModelConfig.from_dir(model)
        return _build(model, mc, dtype_name(mc.resolve_dtype(dtype)), block_size,
                      mc.resolve_max_model_len(max_model_len), cache_salt)

    @staticmethod
    def from_config(cfg: EngineConfig) -> ModelInfo:
        assert cfg.max_model_len is not None  # resolved by EngineConfig.__post_init__
        return _build(cfg.model, cfg.model_config, cfg.dtype_name, cfg.block_size, cfg.max_model_len,
                      cfg.cache_salt)

    def validate_prompt(self, prompt_ids: list[int]) -> None:
        """Raise ValueError with a clear message for a prompt no engine of this model can serve."""
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is required")
        bad = next((t for t in prompt_ids if not 0 <= int(t) < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens but max_model_len is {self.max_model_len}: at most "
                f"{self.max_model_len - 1} prompt tokens fit, leaving room for one generated token"
            )

    def validate_resumed(self, prompt_ids: list[int], resumed: list[int], max_tokens: int, kv_source: Any) -> None:
        """Raise ValueError unless `resumed` (tokens a migrated request already generated) can continue here."""
        if kv_source is not None:
            raise ValueError("a resumed request computes its own prompt: it takes no KV source")
        if len(resumed) >= max_tokens:
            raise ValueError(f"{len(resumed)} tokens already generated, max_tokens is {max_tokens}: nothing left")
        if len(prompt_ids) + len(resumed) >= self.max_model_len:
            raise ValueError(f"prompt and resumed tokens ({len(prompt_ids) + len(resumed)}) leave no room under "
                             f"max_model_len {self.max_model_len}")
        bad = next((t for t in resumed if not 0 <= int(t) < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"resumed token id {bad} is outside the vocabulary [0, {self.vocab_size})")


def _build(model: str, mc: ModelConfig, dtype: str, block_size: int, max_model_len: int,
           cache_salt: str) -> ModelInfo:
    return ModelInfo(model=model, vocab_size=mc.vocab_size, max_model_len=max_model_len, block_size=block_size,
                     hash_salt=mc.hash_salt(dtype, cache_salt), eos_token_ids=mc.eos_token_ids, dtype=dtype)
