"""Llama-family decoder (Llama, Qwen2 with q/k/v bias, Mistral): one forward over a flattened batch."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.kv_cache import KVCache
from engine.kv_connector import LayerHook
from engine.kv_heads import KVHeadSplit
from engine.model_config import ModelConfig
from engine.models.layers import (
    MergedColumnParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from engine.models.rotary import RotaryEmbedding
from engine.parallel import tp


class StepContext:
    """What every layer needs for one step besides the hidden states (built once per step)."""

    def __init__(self, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache,
                 attn: AttentionBackend, rope: RotaryEmbedding, layer_hook: LayerHook | None = None) -> None:
        self.positions = positions  # [T] int64
        self.meta = meta
        self.kv_cache = kv_cache
        self.attn = attn
        self.rope = rope
        self.layer_hook = layer_hook  # called with g after layer group g (engine/kv_connector.py)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        g = tp()
        kv_heads = KVHeadSplit(cfg.num_key_value_heads, g.size, g.rank)
        self.layer = layer
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // g.size
        # NOTE: at TP > num_key_value_heads each rank holds one whole KV head (replicated over kv_heads.replicas
        # ranks); its query heads are a slice of that head's GQA group, so attention stays rank-local.
        self.num_kv_heads = kv_heads.count
        q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        r = kv_heads.replicas
        self.qkv_proj = MergedColumnParallelLinear(cfg.hidden_size, [q_out, kv_out, kv_out], cfg.qkv_bias, dtype,
                                                   replicas=[1, r, r])
        self.o_proj = RowParallelLinear(q_out, cfg.hidden_size, dtype)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        # rotary embedding and the K/V store, then attention: [T, Hq, D]
        out = ctx.attn.forward_rotary(self.layer, q, k, v, ctx.kv_cache, ctx.meta, ctx.rope, ctx.positions)
        return self.o_proj(out.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], False, dtype)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, dtype, gated_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj.forward_gated(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer, dtype)
        self.mlp = LlamaMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output [T, hidden]; residual: the residual stream before it (None at the
        first layer). Returns (this layer's output, the residual stream before it); the caller adds them."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x = self.input_layernorm(x, residual)  # residual += x, then norm
        x = self.self_attn(x, ctx)
        x = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our parameter name fragment, shard id within a merged weight)
    STACKED: ClassVar[dict[str, tuple[str, int]]] = {
        ".q_proj.": (".qkv_proj.", 0),
        ".k_proj.": (".qkv_proj.", 1),
        ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            self.embed_tokens if cfg.tie_word_embeddings
            else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        )

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:  # [T] -> [T, hidden]
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        hook, per_group = ctx.layer_hook, ctx.kv_cache.layout.layers_per_group
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, ctx)
            if hook is not None and (i + 1) % per_group == 0:
                hook(i // per_group)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        return self.lm_head.logits(hidden).float()

    def map_checkpoint_name(self, name: str) -> tuple[str, int] | None:
        """HF checkpoint tensor name -> (our parameter name, shard id); None for tensors we do not use."""
        if "rotary_emb" in name:
            return None
        name = name.removeprefix("model.")
        if name.startswith("lm_head.") and self.cfg.tie_word_embeddings:
            return None
        for frag, (ours, shard) in self.STACKED.items():
            if frag in name:
                return name.replace(frag, ours), shard
        return name, 0
