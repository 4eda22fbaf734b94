"""Engine configuration: every knob of one engine instance, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from engine.attention import BACKEND_NAMES
from engine.kv_heads import check_kv_head_split
from engine.model_config import ModelConfig, dtype_name

LOAD_FORMATS = ("auto", "safetensors", "dummy")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineConfig:
    """What `LLM(...)` and the workers accept. Unknown values raise ValueError naming the field."""

    model: str
    dtype: str = "auto"
    load_format: str = "auto"
    device: str = "auto"
    block_size: int = 16
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.85
    attention_backend: str = "auto"  # auto | torch | triton | flash-attn
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    # Launch step n+1 before reading step n's tokens (the host's work hides behind the device's). None: on for
    # CUDA at tensor_parallel_size 1, off otherwise. step() then returns a step's tokens one call later.
    async_scheduling: bool | None = None
    # Before serving, run a few tiny requests through the engine in the step shapes serving meets (several prompts
    # in one step, a prompt continued on a cached prefix, a chunked prompt, prefill beside decode rows), so the GPU
    # kernels those shapes need are compiled then, not in the middle of a request (engine/warmup.py). None: on for
    # CUDA, off on CPU (nothing is compiled there).
    warmup: bool | None = None
    cache_salt: str = ""
    # KV cache layer groups (docs/kv-layout.md): the unit of layer-wise KV streaming from a prefill instance; the
    # cache gets the largest divisor of the model's layer count that is <= this. Prefill and decode must agree.
    kv_layer_groups: int = 4
    model_config: ModelConfig = field(init=False, repr=False)
    torch_dtype: torch.dtype = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Machine-independent checks only (the serving YAML is validated by building this on the router's
        machine, which may have no GPU): what this machine has is checked by `resolved()`."""
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format: {self.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device: {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.attention_backend not in (*BACKEND_NAMES, "auto"):
            raise ValueError(f"attention_backend: {self.attention_backend!r} is not one of auto, "
                             f"{', '.join(BACKEND_NAMES)}")
        if not Path(self.model).is_dir():
            raise ValueError(f"model: {self.model!r} is not a directory with a config.json")
        self.model_config = ModelConfig.from_dir(self.model)
        mc = self.model_config
        self.torch_dtype = mc.resolve_dtype(self.dtype)
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError("async_scheduling: needs tensor_parallel_size 1 (the other ranks would need the "
                             "sampled tokens, which stay on the driver's device)")
        bs = self.block_size
        if bs <= 0 or bs & (bs - 1):
            raise ValueError(f"block_size: {bs} is not a positive power of two")
        tp = self.tensor_parallel_size
        if tp not in (1, 2, 4, 8):
            raise ValueError(f"tensor_parallel_size: {tp} is not one of 1, 2, 4, 8")
        for name, count in (("num_attention_heads", mc.num_attention_heads),
                            ("intermediate_size", mc.intermediate_size)):
            if count % tp:
                raise ValueError(
                    f"tensor_parallel_size: {tp} does not divide the model's {name} ({count})"
                )
        # NOTE: KV heads split over ranks when tp divides them, and are replicated when tp is a multiple of them
        # (engine/kv_heads.py); each rank's query heads then all share the one KV head it holds.
        check_kv_head_split(mc.num_key_value_heads, tp)
        # NOTE: shared with engine/model_info.py (the router's model facts), so the two cannot drift.
        self.max_model_len = mc.resolve_max_model_len(self.max_model_len)
        if self.kv_layer_groups < 1:
            raise ValueError(f"kv_layer_groups: {self.kv_layer_groups} must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: {self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: {self.max_num_batched_tokens} must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens: {self.max_num_batched_tokens} is below max_model_len "
                f"({self.max_model_len}); without chunked prefill a whole prompt must fit in one step"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks * bs < self.max_model_len:
            raise ValueError(
                f"num_kv_blocks: {self.num_kv_blocks} blocks of {bs} tokens cannot hold one sequence of "
                f"max_model_len={self.max_model_len}; raise num_kv_blocks or lower max_model_len"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization} must be in (0, 1]")

    def resolved(self, gpus_needed: int | None = None) -> EngineConfig:
        """A copy made concrete for this machine: `device` "auto" becomes cuda or cpu, `async_scheduling` None
        becomes on (CUDA at TP 1) or off, `warmup` None on (CUDA) or off, and the GPUs this process needs must
        be visible: `gpus_needed`, by default every rank's (ranks started elsewhere, each with its own GPU, need
        one here: RankLauncher.gpus_needed_here). Idempotent. The engine calls it first thing, so everything below
        LLMEngine sees a resolved config."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tp = self.tensor_parallel_size
        need = tp if gpus_needed is None else gpus_needed
        if device == "cuda" and need > torch.cuda.device_count():
            what = "that many GPUs" if need == tp else f"{need} GPU(s) in this process"
            raise ValueError(f"tensor_parallel_size: {tp} needs {what}; {torch.cuda.device_count()} visible "
                             "(NCCL cannot put two ranks on one GPU)")
        async_scheduling = self.async_scheduling
        if async_scheduling is None:
            async_scheduling = device == "cuda" and tp == 1
        warmup = device == "cuda" if self.warmup is None else self.warmup
        return replace(self, device=device, async_scheduling=async_scheduling, warmup=warmup)

    @property
    def is_resolved(self) -> bool:
        return self.device != "auto" and self.async_scheduling is not None and self.warmup is not None

    @property
    def max_blocks_per_seq(self) -> int:
        assert self.max_model_len is not None
        return -(-self.max_model_len // self.block_size)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.torch_dtype)

    @property
    def hash_salt(self) -> str:
        """Salt of the prefix-cache block hashes: equal only for engines whose KV for equal tokens is equal."""
        return self.model_config.hash_salt(self.dtype_name, self.cache_salt)
