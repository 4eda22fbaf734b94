"""pdserve's shared model-execution core: paged KV cache, prefix caching, continuous batching."""

from engine.block_pool import KVEvent
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "KVEvent", "LLMEngine", "RequestOutput", "SamplingParams"]
