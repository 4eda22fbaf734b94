"""Tiny, offline, deterministic model checkpoints and a transformers greedy reference for tests.

``make_tiny_model`` writes a HuggingFace-style directory (nothing is downloaded):

* ``config.json`` (transformers 5.23). Keys the engine loader should read:
  ``architectures`` (e.g. ``["LlamaForCausalLM"]``), ``model_type`` (``llama``/``qwen2``/``mistral``),
  ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
  ``num_key_value_heads``, ``head_dim`` (llama/mistral only; qwen2 omits it -> hidden_size // heads),
  ``vocab_size``, ``max_position_embeddings``, ``rms_norm_eps``, ``hidden_act`` (``silu``),
  ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (null), ``tie_word_embeddings``,
  ``dtype`` (``"float32"``; there is NO ``torch_dtype`` key), and
  ``rope_parameters`` = ``{"rope_theta": 10000.0, "rope_type": "default"}`` or, with rope scaling,
  e.g. ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
  "original_max_position_embeddings": 64, "rope_theta": 10000.0}`` (there is NO ``rope_scaling`` /
  top-level ``rope_theta`` key).
  llama: ``attention_bias`` (false), ``mlp_bias`` (false), ``pretraining_tp``.
  qwen2: no ``attention_bias`` key (q/k/v always have a bias, o_proj none), ``use_sliding_window``
  (false), ``sliding_window`` (null), ``max_window_layers``, ``layer_types`` (all ``full_attention``).
  mistral: ``sliding_window`` (null -> full attention), no bias anywhere.
* ``model.safetensors`` (float32; ``lm_head.weight`` is absent when ``tie_word_embeddings`` is true).
* ``generation_config.json``, ``tokenizer.json`` and a minimal ``tokenizer_config.json`` (with a small chat
  template, ``CHAT_TEMPLATE``).

Weights are re-initialised with a large std so greedy logits have clear top-1/top-2 gaps, biases
(qwen2 q/k/v) are random non-zero and RMSNorm weights are ``1 + 0.1 * randn`` so every path matters.
"""

from __future__ import annotations

import json
import pathlib
import random
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

__all__ = [
    "ARCHS",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "build_tokenizer",
    "hf_greedy",
    "hf_greedy_batch",
    "hf_logprobs",
    "make_tiny_model",
    "random_prompts",
]

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
WEIGHT_STD = 0.2

hf_logging.disable_progress_bar()  # keep test output quiet (save/load shard progress bars)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A large language model predicts the next token of a text,
one token at a time, and a serving engine keeps the keys and values of earlier tokens in a cache so that
it does not have to compute them again. Requests arrive at different times and have prompts of different
lengths; the scheduler batches them together, splits long prompts into chunks, and frees the memory of a
request when it is finished. It was the best of times, it was the worst of times, it was the age of
wisdom, it was the age of foolishness. Once upon a time there was a little girl who lived in a village
near the forest. Whenever she went out, the little girl wore a red riding cloak, so everyone in the
village called her Little Red Riding Hood. Hello, world! How are you today? I am fine, thank you, and
you? Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in text too, as do symbols: + - * / = ( ).
"""


# A small chat template (Jinja, as in a real tokenizer_config.json), for the OpenAI chat endpoint's tests.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Return a deterministic byte-level BPE tokenizer (``<unk>``=0, ``<s>``=1, ``</s>``=2, no BOS added).

    The 256 byte symbols are always present, so any text round-trips exactly through encode/decode;
    the remaining ``vocab_size - 259`` ids are merges trained in-process on a small built-in text.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() <= vocab_size
    return tok


def _reinit_weights(model: PreTrainedModel) -> None:
    """Re-initialise all parameters: matrices N(0, WEIGHT_STD), biases 0.1*randn, norms 1+0.1*randn."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, WEIGHT_STD)


def make_tiny_model(
    out_dir: pathlib.Path,
    arch: str,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    num_hidden_layers: int = 2,
    **overrides: Any,
) -> pathlib.Path:
    """Build a tiny random float32 GQA model of ``arch`` ("llama", "qwen2", "mistral") into ``out_dir``.

    ``rope_scaling`` (e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``) ends up in the config as
    ``rope_parameters``; ``overrides`` are passed verbatim to the config class.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    config_cls, model_cls = ARCHS[arch]
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "initializer_range": WEIGHT_STD,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": tie_word_embeddings,
        "dtype": "float32",
    }
    if arch != "qwen2":
        kwargs["head_dim"] = 16  # qwen2 derives it: hidden_size // num_attention_heads == 16
    if arch in ("mistral", "qwen2"):
        kwargs["sliding_window"] = None
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    if rope_scaling is not None:
        rope = {"rope_theta": 10000.0, **rope_scaling}
        rope.setdefault("rope_type", rope.get("type", "default"))
        rope.pop("type", None)
        kwargs["rope_parameters"] = rope
    kwargs.update(overrides)
    config = config_cls(**kwargs)

    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    _reinit_weights(model)
    if tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(config.vocab_size).save(str(out_dir / "tokenizer.json"))
    tok_cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out_dir


_MODEL_CACHE: dict[tuple[str, int], PreTrainedModel] = {}
_GREEDY_CACHE: dict[tuple[str, int, tuple[int, ...], int], list[int]] = {}


def _load(model_dir: pathlib.Path) -> PreTrainedModel:
    """Load (and cache, keyed by path + weights mtime) a float32 eval-mode transformers model."""
    path = pathlib.Path(model_dir).resolve()
    weights = path / "model.safetensors"
    key = (str(path), weights.stat().st_mtime_ns if weights.exists() else 0)
    model = _MODEL_CACHE.get(key)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        # generate() fills None fields from model.generation_config, so drop EOS there too.
        model.generation_config.eos_token_id = None
        _MODEL_CACHE[key] = model
    return model


def _greedy_config(max_new_tokens: int) -> GenerationConfig:
    """Pure argmax decoding config: no EOS (never stops early, EOS logit never masked), no processors."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=1,
    )


def hf_greedy(model_dir: pathlib.Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy-decode ``max_new_tokens`` tokens with transformers; return only the generated ids.

    Decoding is pure argmax for exactly ``max_new_tokens`` steps: EOS neither stops generation nor is
    masked out (unlike ``min_new_tokens``), matching an engine run with ``ignore_eos``. Results are memoised
    (keyed like the model cache), so test modules that check the same prompt share one transformers run.
    """
    path = pathlib.Path(model_dir).resolve()
    weights = path / "model.safetensors"
    key = (str(path), weights.stat().st_mtime_ns if weights.exists() else 0, tuple(prompt_ids), max_new_tokens)
    if key in _GREEDY_CACHE:
        return list(_GREEDY_CACHE[key])
    model = _load(model_dir)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=_greedy_config(max_new_tokens),
        )
    _GREEDY_CACHE[key] = [int(t) for t in out[0, len(prompt_ids) :].tolist()]
    return list(_GREEDY_CACHE[key])


def hf_greedy_batch(
    model_dir: pathlib.Path, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Run :func:`hf_greedy` on each prompt separately (no padding, so the reference stays exact)."""
    return [hf_greedy(model_dir, p, max_new_tokens) for p in prompts]


def random_prompts(n: int, lengths: list[int] | None, vocab_size: int, seed: int) -> list[list[int]]:
    """Return ``n`` deterministic prompts of ids in ``[3, vocab_size)`` (special ids 0-2 excluded).

    ``lengths`` gives each prompt's length (cycled if shorter than ``n``); if None, lengths are
    drawn uniformly from ``[1, 64]``.
    """
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    for i in range(n):
        length = lengths[i % len(lengths)] if lengths else rng.randint(1, 64)
        prompts.append([rng.randrange(3, vocab_size) for _ in range(length)])
    return prompts


def hf_logprobs(model_dir: pathlib.Path, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' log_softmax over the logits at each generated token's position: [len(generated), V]
    float32 (row i is the distribution generated[i] was drawn from), from one forward over prompt + generated."""
    model = _load(model_dir)
    input_ids = torch.tensor([prompt_ids + generated[:-1]], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=torch.ones_like(input_ids)).logits[0].float()  # [T, V]
    return torch.log_softmax(logits[len(prompt_ids) - 1:], dim=-1)  # [len(generated), V]
