"""Turns a scheduled batch into one model forward: flattened tokens, positions, slot mapping, block tables."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, select_backend
from engine.config import EngineConfig
from engine.cuda_graph import DecodeGraphs, batch_buckets
from engine.inflight import feed_tokens
from engine.kv_cache import KVCache, KVLayout, layer_groups_for
from engine.kv_connector import LayerHook
from engine.kv_heads import KVHeadSplit
from engine.models import skinny_gemm
from engine.models.layers import RowParallelLinear
from engine.models.llama import StepContext
from engine.models.loader import load_model
from engine.models.rotary import RotaryEmbedding
from engine.parallel import tp
from engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 256 << 20


@dataclass
class StepInput:
    """One step's model inputs as numpy arrays, so the driver can hand them to the other TP ranks cheaply."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32
    logits_indices: np.ndarray  # [N] int64: rows whose next-token logits are needed (requests at their end)
    max_query_len: int
    max_seq_len: int
    # [T] int64 or None (async scheduling): for each token, the row of the previous step's sampled tokens that
    # replaces its placeholder input id, or -1 where input_ids already holds the token.
    feed: np.ndarray | None = None


def build_step_input(out: SchedulerOutput, block_size: int) -> StepInput:
    reqs = out.requests
    n = np.asarray(out.num_scheduled_tokens, dtype=np.int64)  # [B]
    starts = np.fromiter((r.num_computed_tokens for r in reqs), dtype=np.int64, count=len(reqs))  # [B]
    qsl = np.zeros(len(reqs) + 1, dtype=np.int64)  # [B+1]
    np.cumsum(n, out=qsl[1:])
    total = int(qsl[-1])
    req_of_token = np.repeat(np.arange(len(reqs)), n)  # [T]
    positions = np.arange(total, dtype=np.int64) - qsl[:-1][req_of_token] + starts[req_of_token]  # [T]
    input_ids = np.fromiter(
        (t for r, s, k in zip(reqs, starts.tolist(), n.tolist(), strict=True) for t in r.all_token_ids[s : s + k]),
        dtype=np.int64, count=total,
    )  # [T]
    seq_lens = starts + n  # [B]
    max_blocks = int(-(-seq_lens.max() // block_size)) if len(reqs) else 1
    tables = np.zeros((len(reqs), max_blocks), dtype=np.int32)  # [B, max_blocks]
    for i, r in enumerate(reqs):
        ids = r.block_ids[:max_blocks]
        tables[i, : len(ids)] = ids
    slots = tables[req_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    at_end = np.fromiter((r.num_tokens for r in reqs), dtype=np.int64, count=len(reqs)) == seq_lens  # [B]
    return StepInput(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slots,
        query_start_loc=qsl.astype(np.int32),
        seq_lens=seq_lens.astype(np.int32),
        block_tables=tables,
        logits_indices=(qsl[1:] - 1)[at_end],
        max_query_len=int(n.max()) if len(reqs) else 0,
        max_seq_len=int(seq_lens.max()) if len(reqs) else 0,
    )


class ModelRunner:
    """Owns this rank's model, KV cache and attention backend. `execute` is called on every TP rank with the
    same StepInput; only the driver's logits are used. `counters` counts this runner's fallbacks (CUDA graphs
    off or failed); the engine folds them into its metrics (`EngineMetrics.watch`)."""

    def __init__(self, config: EngineConfig) -> None:
        if not config.is_resolved:
            raise ValueError("ModelRunner needs a config resolved for this machine (EngineConfig.resolved())")
        self.config = config
        self.counters: Counter[str] = Counter()
        mc = config.model_config
        self.device = torch.device(config.device, torch.cuda.current_device()) if config.device == "cuda" \
            else torch.device("cpu")
        self.model = load_model(config.model, mc, config.torch_dtype, str(self.device), config.load_format)
        if self.device.type == "cuda":
            # NOTE: before the KV cache is sized and the graphs are captured (skinny_gemm's contract).
            gated = [m.weight for m in self.model.modules() if isinstance(m, RowParallelLinear) and m.gated_input]
            skinny_gemm.tune((p for p in self.model.parameters() if p.dim() == 2), batch_buckets(config.max_num_seqs),
                             gated=gated)
        size = tp().size
        self.kv_heads = KVHeadSplit(mc.num_key_value_heads, size, tp().rank)  # this rank's KV heads
        self.num_kv_heads = self.kv_heads.count
        self.layout = KVLayout(
            num_blocks=self._plan_num_blocks(),
            num_kv_heads=self.num_kv_heads,
            num_layers=mc.num_hidden_layers,
            block_size=config.block_size,
            head_dim=mc.head_dim,
            element_size=torch.empty((), dtype=config.torch_dtype).element_size(),
            num_layer_groups=layer_groups_for(mc.num_hidden_layers, config.kv_layer_groups),
        )
        self.kv_cache = KVCache(self.layout, config.torch_dtype, self.device)
        backend_cls = select_backend(config.attention_backend, config.device, config.block_size, mc.head_dim,
                                     config.torch_dtype)
        self.attn = backend_cls(mc.num_attention_heads // size, self.num_kv_heads, mc.head_dim,
                                mc.head_dim**-0.5, config.block_size)
        assert config.max_model_len is not None
        self.rope = RotaryEmbedding(mc.head_dim, config.max_model_len, mc.rope, config.torch_dtype, self.device)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            if self.attn.name == "triton":
                self.graphs = DecodeGraphs(self, config.max_num_seqs, config.max_blocks_per_seq)
                try:
                    self.graphs.capture()
                except RuntimeError:
                    # NOTE: visible, counted, and the engine still serves (eagerly): a capture failure is a
                    # performance bug, not a reason to refuse traffic.
                    self.counters["cuda_graph_capture_failures"] += 1
                    log.exception("CUDA graph capture failed; decode steps run eagerly")
                    self.graphs = None
            else:
                log.warning("CUDA graphs need the triton attention backend; %s runs decode steps eagerly",
                            self.attn.name)
        log.info("rank %d: %d KV blocks of %d tokens (%.1f MiB), attention backend %s, CUDA graphs %s", tp().rank,
                 self.layout.num_blocks, config.block_size, self.layout.total_bytes / 2**20, self.attn.name,
                 "on" if self.graphs else "off")

    def _plan_num_blocks(self) -> int:
        cfg, mc = self.config, self.config.model_config
        per_block = KVCache.bytes_per_block(self.num_kv_heads, mc.num_hidden_layers, cfg.block_size,
                                            mc.head_dim, cfg.torch_dtype)
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Memory this process's allocator holds but does not use (e.g. an engine shut down earlier in the
            # process) is as good as free.
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            budget = int(free - (1 - cfg.gpu_memory_utilization) * total)
            if budget <= 0:
                raise ValueError(
                    f"gpu_memory_utilization: {cfg.gpu_memory_utilization} leaves no room for a KV cache "
                    f"({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after the weights; another process "
                    "may share this GPU). Raise it, or set kv_cache_memory_bytes / num_kv_blocks")
        else:
            budget = DEFAULT_CPU_KV_BYTES
        blocks = budget // per_block
        if blocks * cfg.block_size < (cfg.max_model_len or 0):
            raise ValueError(
                f"KV cache budget of {budget / 2**20:.0f} MiB holds {blocks} blocks, fewer than one sequence of "
                f"max_model_len={cfg.max_model_len} needs; raise kv_cache_memory_bytes or lower max_model_len"
            )
        return int(blocks)

    def reset_activity(self) -> None:
        """Zero the counts of how steps ran (decode graph replays and their host time, dense prefill steps): after
        the engine's warm-up, so that they count serving only. Fallback counters (`counters`) are kept."""
        if self.graphs is not None:
            self.graphs.replays, self.graphs.replay_host_s = 0, 0.0
        self.attn.dense_prefill_steps = 0

    def release(self) -> None:
        """Drop the model and the KV cache (on shutdown), returning GPU memory to the device."""
        self.graphs = None
        self.model = None  # type: ignore[assignment]
        self.kv_cache = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                layer_hook: LayerHook | None = None) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]. `layer_hook(g)` is called after each
        layer group's layers are issued (layer-wise KV streaming)."""
        self.attn.prepare(meta)
        return self.model(input_ids, StepContext(positions, meta, self.kv_cache, self.attn, self.rope, layer_hook))

    def forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> logits [T, vocab] float32 of every row (the decode graphs' body)."""
        return self.model.compute_logits(self.forward(input_ids, positions, meta))

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type == "cuda":
            # NOTE: from pinned memory the copy is truly asynchronous; the caching host allocator keeps the
            # buffer alive until the copy is done.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.inference_mode()
    def execute(self, inp: StepInput, prev_tokens: torch.Tensor | None = None,
                layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Run one forward over the batch; returns logits [N, vocab] float32 for inp.logits_indices.
        `prev_tokens` [P] int64 (on this device): the previous step's sampled tokens, which `inp.feed` places."""
        if layer_hook is None and self.graphs is not None and self.graphs.can_run(inp):
            return self.graphs.run(inp, prev_tokens)
        dev = self._to_device
        meta = AttentionMetadata(
            slot_mapping=dev(inp.slot_mapping),
            query_start_loc=dev(inp.query_start_loc),
            seq_lens=dev(inp.seq_lens),
            block_tables=dev(inp.block_tables),
            max_query_len=inp.max_query_len,
            max_seq_len=inp.max_seq_len,
        )
        input_ids = dev(inp.input_ids)  # [T]
        if inp.feed is not None:
            assert prev_tokens is not None, "a step with placeholder inputs needs the previous step's tokens"
            input_ids = feed_tokens(input_ids, dev(inp.feed), prev_tokens)
        hidden = self.forward(input_ids, dev(inp.positions), meta, layer_hook)  # [T, hidden]
        return self.model.compute_logits(hidden[dev(inp.logits_indices)])  # [N, vocab]
