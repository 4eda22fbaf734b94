"""Build a model for this rank and fill its weights from safetensors, or with deterministic dummy values."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.model_config import ModelConfig
from engine.models.layers import MergedColumnParallelLinear
from engine.models.llama import LlamaForCausalLM
from engine.parallel import tp

log = logging.getLogger(__name__)

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def load_model(model_dir: str, cfg: ModelConfig, dtype: torch.dtype, device: str,
               load_format: str = "auto") -> LlamaForCausalLM:
    cls = MODEL_REGISTRY.get(cfg.architecture)
    if cls is None:
        raise ValueError(f"unsupported model architecture {cfg.architecture!r}")
    with torch.device(device):
        model = cls(cfg, dtype)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if load_format == "dummy":
        _fill_dummy(model)
    elif not files:
        raise ValueError(f"model directory {model_dir} has no *.safetensors files; pass load_format='dummy' "
                         "for random weights")
    else:
        _load_safetensors(model, files, device)
    return model.eval()


def _load_safetensors(model: LlamaForCausalLM, files: list[Path], device: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for ckpt_name in f.keys():
                mapped = model.map_checkpoint_name(ckpt_name)
                if mapped is None:
                    continue
                name, shard = mapped
                if name not in params:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} in {path.name} matches no model parameter")
                param = params[name]
                tensor = f.get_tensor(ckpt_name).to(dtype=param.dtype, device=device)
                param.weight_loader(param, tensor, shard)  # type: ignore[attr-defined]
                loaded.add(name)
    missing = {n for n in params if n not in loaded and not _is_tied_alias(model, n)}
    if missing:
        raise ValueError(f"checkpoint is missing weights for: {', '.join(sorted(missing)[:8])}")


def _is_tied_alias(model: LlamaForCausalLM, name: str) -> bool:
    return model.cfg.tie_word_embeddings and name.startswith("lm_head.")


def _fill_dummy(model: nn.Module) -> None:
    """Deterministic random weights of the real shapes: each tensor seeded from its name and the TP rank, so
    every run (and every machine) gets the same model without reading a checkpoint. Replicated rows (K/V at
    TP > KV heads) are seeded from the slice they copy instead, so replicas stay identical."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=_generator(f"{name}:{tp().rank}", param.device))
    for mod_name, module in model.named_modules():
        if not isinstance(module, MergedColumnParallelLinear):
            continue
        for p_name, param in module.named_parameters(recurse=False):
            offset = 0
            for shard, (size, replicas) in enumerate(zip(module.local_sizes, module.replicas, strict=True)):
                if replicas > 1:
                    # NOTE: keyed by the slice (rank // replicas), not the rank: every replica draws the same rows.
                    key = f"{mod_name}.{p_name}:shard{shard}:slice{tp().rank // replicas}"
                    param.data.narrow(0, offset, size).normal_(0.0, 0.02, generator=_generator(key, param.device))
                offset += size
    log.info("filled model with dummy weights")


def _generator(key: str, device: torch.device) -> torch.Generator:
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return torch.Generator(device=device).manual_seed(seed & ((1 << 63) - 1))
